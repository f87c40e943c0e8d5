"""Where do the engine's answers die, and how often does LoPA's verification pick a branch no answer can follow?
The engine's own decoding (``LLM.generate`` with ``trace``), replayed step by step with the task's exact
posterior as the judge.

``scripts/branch_verification.py`` replays one LoPA step over threshold on states of the training loop; this
script follows the engine itself, for any base decoder (threshold or d2f) and any k, on the test problems. Every
trace step lists the candidates verified at that forward (the anchor, i.e. the state after the previous anchor
fill, and the lookahead branches, each the anchor plus one token), the winner and the winner's anchor fill
(``lopa.engine.output.TraceStep``). A state is *live* when some phrasing of the problem agrees with its filled
answer positions (``lopa.tiny.posterior``; positions after the first filled end token are ignored, as the engine's
answer stops there), *dead* when none does. Per decoder:

- **died**: answers whose state turns dead at some step, split by what killed them first: the *pick* (a dead
  lookahead branch won over a live anchor) or the base decoder's *fill* (the anchor fill, or with k = 0 every fill);
  the same split for the dead answers scored wrong (a dead answer can still end in the right ``#### N``: a wrong
  name, a repeated number in a count), and the live answers scored wrong (only an answer cut off by the length);
- **contested** steps (live and dead candidates verified together) and how often a dead one won there; of those
  dead winners, the median distance of the extra position right of the leftmost masked position, how many lie in
  a later block than that position, and how many write a number;
- exact and well-formed accuracy, TPF, as in ``lopa bench``.

Every answer's replayed fills are checked against the engine's returned tokens. Prints a table, then one JSON line.

    python scripts/engine_verification.py lopa/tiny/checkpoint --n 200 --decoders d2f lopa-d2f-k4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from lopa import LLM
from lopa.config import DecodeConfig
from lopa.engine.output import Completion
from lopa.tiny import task
from lopa.tiny.bench_sweep import variants
from lopa.tiny.grammar import parse
from lopa.tiny.posterior import FREE, Phrasings
from lopa.tiny.train_loop import text_codec
from lopa.tiny.vocab import build_tokenizer, special_ids


def _judge(phrasings: Phrasings, fixed: list[int], end_id: int) -> bool:
    """Whether some phrasing agrees with ``fixed`` (answer positions, FREE where masked) up to its first end."""
    seen = list(fixed)
    if end_id in seen:
        first = seen.index(end_id)
        seen[first + 1 :] = [FREE] * (len(seen) - first - 1)
    return phrasings.count(seen) > 0


def replay(out: Completion, phrasings: Phrasings, end_id: int, room: int, block_size: int) -> dict:
    """One answer's trace, judged step by step: where it first died, its contested steps, and per dead winner
    (distance right of the leftmost masked position, whether it lies in a later block than that one, its token)."""
    if out.trace is None:
        raise ValueError("the completion carries no trace (decode with trace=True)")
    p = len(out.prompt_token_ids)
    fixed = [FREE] * room
    died, contested, dead_picks = "", 0, []
    for step in out.trace:
        cands = step.candidates
        if len(cands) > 1:  # lookahead branches first, the anchor last
            live = []
            for c in cands:
                branch = list(fixed)
                if c["kind"] == "lookahead":
                    branch[c["extra_position"] - p] = c["extra_token"]
                live.append(_judge(phrasings, branch, end_id))
            if any(live) and not all(live):
                contested += 1
                if not live[step.winner]:
                    at, left = cands[step.winner]["extra_position"] - p, fixed.index(FREE)
                    dead_picks.append(
                        (at - left, at // block_size > left // block_size, cands[step.winner]["extra_token"])
                    )
        for position, token, picked in step.fills():
            fixed[position - p] = token
            if picked and not died and not _judge(phrasings, fixed, end_id):
                died = "pick"
        if not died and not _judge(phrasings, fixed, end_id):
            died = "fill"
    produced = out.token_ids + [end_id] if out.finish_reason == "stop" else out.token_ids
    if fixed[: len(produced)] != produced:
        raise AssertionError("the trace's fills do not reproduce the engine's answer")
    return {"died": died, "contested": contested, "dead_picks": dead_picks}


def audit(llm: LLM, problems: list[task.Problem], row: DecodeConfig, end_id: int, encode, decode) -> dict:  # noqa: ANN001
    """Decode ``problems`` with one of the bench's rows (``row``, traced) and replay every answer."""
    cfg = row.replace(trace=True).validate()
    outs = llm.generate([q.prompt for q in problems], cfg, raw=True)
    room = cfg.max_new_tokens
    rows = [
        replay(o, Phrasings(q, encode, end_id, room), end_id, room, cfg.block_size)
        for o, q in zip(outs, problems, strict=True)
    ]
    picks = [d for r in rows for d in r["dead_picks"]]
    right = [task.extract_answer(o.text) == q.answer for o, q in zip(outs, problems, strict=True)]
    formed = [parse(o.text) for o in outs]
    died = [r["died"] for r in rows]
    contested = sum(r["contested"] for r in rows)
    return {
        "n": len(problems),
        "exact": sum(right) / len(problems),
        "wellformed": sum(formed) / len(problems),
        "tpf": sum(o.stats.tokens for o in outs) / sum(o.stats.forwards for o in outs),
        "died": sum(bool(d) for d in died),
        "died_pick": died.count("pick"),
        "died_fill": died.count("fill"),
        "died_right": sum(bool(d) and r for d, r in zip(died, right, strict=True)),  # dead yet `#### N` right
        "wrong_pick": sum(d == "pick" and not r for d, r in zip(died, right, strict=True)),
        "wrong_fill": sum(d == "fill" and not r for d, r in zip(died, right, strict=True)),
        "live_wrong": sum(not d and not r for d, r in zip(died, right, strict=True)),
        "contested": contested,
        "dead_winners": len(picks),
        "dead_winner": len(picks) / max(contested, 1),
        "dead_winner_ahead": statistics.median(a for a, _, _ in picks) if picks else None,
        "dead_winner_later_block": sum(later for _, later, _ in picks),
        "dead_winner_number": sum(decode([t]).strip().isdigit() for _, _, t in picks),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", type=Path, help="tiny Dream checkpoint directories")
    p.add_argument("--n", type=int, default=200, help="test problems, the fixed set's first n (default: 200)")
    p.add_argument("--decoders", nargs="+", default=["d2f", "lopa-d2f-k4", "threshold", "lopa-threshold-k4"])
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    args = p.parse_args(argv)
    known = variants(32, 64)
    if args.n < 1:
        p.error("--n must be >= 1")
    if unknown := [d for d in args.decoders if d not in known]:
        p.error(f"unknown decoder(s) {unknown}; known: {', '.join(known)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    problems = task.fixed_set("test", args.n)
    print(f"{len(problems)} test problems; the engine's traces judged by the task's exact posterior")
    print(
        "| model | decoder | exact / well-formed %, TPF | died (pick / fill) | of them wrong (pick / fill) "
        "| dead but right | live but wrong | contested steps | dead winner | median ahead | in a later block "
        "| numbers |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    results: dict[str, dict] = {}
    tok = build_tokenizer()
    encode, decode = text_codec(tok)
    end_id = special_ids(tok)["eos_token_id"]
    for path in args.models:
        llm = LLM(str(path), device="cpu")
        for name in args.decoders:
            r = audit(llm, problems, known[name], end_id, encode, decode)
            results[f"{path} {name}"] = r
            print(
                f"| {path} | {name} | {100 * r['exact']:.1f} / {100 * r['wellformed']:.1f}, {r['tpf']:.2f} | "
                f"{r['died']} ({r['died_pick']} / {r['died_fill']}) | {r['wrong_pick']} / {r['wrong_fill']} | "
                f"{r['died_right']} | {r['live_wrong']} | "
                f"{r['contested']} | {100 * r['dead_winner']:.1f}% | {r['dead_winner_ahead']} | "
                f"{r['dead_winner_later_block']} / {r['dead_winners']} | "
                f"{r['dead_winner_number']} / {r['dead_winners']} |",
                flush=True,
            )
    print(json.dumps({"n": len(problems), "models": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
