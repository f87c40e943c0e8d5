"""Where threshold's wrong answers begin: every fill of the reference loop judged by the task's exact posterior.

Runs ``lopa.tiny.evaluate``'s threshold loop (full-row forwards under the training layout, blocks of 32) and
watches every forward's fill through its ``observe`` hook. Each filled position's confidence q (the model's
probability of the token it writes) is set against that token's exact posterior probability π given the positions
fixed before the forward (``lopa.tiny.posterior``: the phrasings that agree with the token, over those that agree
with the state; wordings are uniform and independent). A calibrated model has mean π ≈ mean q in every confidence
bin; a fill with π = 0 is *dead*: no phrasing, so no correct answer, can follow it.

The forward that takes an answer from live to dead is its *first death*, of one of three kinds:

- ``fallback``: no position passed τ, so the single most confident one was filled, and it was dead;
- ``above τ, alone``: a fill above τ was dead by itself;
- ``above τ, joint``: every fill was live alone, but no phrasing agrees with all of them together (positions
  filled at once from one forward's marginals).

``ahead`` is how far the dead fill sits right of the leftmost masked position of its block (0: the next token).
The kinds are counted over the *fatal* deaths, the answers the task's scorer calls wrong or malformed; an answer
can die and still be scored right and well-formed (``died, scored right``), since the scorer reads the number
after ``####`` and the grammar, not the problem's name or every count. An answer that never dies is a whole
phrasing, so the scorer must call it right and well-formed; the script counts the answers where the two disagree
(``live but wrong``, expected 0) as a check of both. ``wrong name``: answers that name a person other than the
question's (the closing ``{name} has {r} {item} now.``), which the scorer does not check; ``copy probe``: on the
problems whose reference answer ends with that closing, the whole reference answer but one position (the name,
then the item, in the closing) given, the model's mean probability of the right token there (chance for a name:
1/12). Prints a table per model and τ, then one JSON line.

    python scripts/commit_calibration.py lopa/tiny/checkpoint --n 600 --tau 0.9 0.7
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from statistics import median

import torch
from torch import Tensor

from lopa.checkpoint.loader import load_checkpoint
from lopa.model.transformer import Transformer
from lopa.tiny import task
from lopa.tiny.data import Layout, answer_logits_idx, block_causal_mask, encode_rows
from lopa.tiny.evaluate import greedy_decode
from lopa.tiny.grammar import parse
from lopa.tiny.posterior import FREE, Phrasings
from lopa.tiny.train_loop import text_codec
from lopa.tiny.vocab import build_tokenizer, special_ids

BINS = (0.0, 0.5, 0.7, 0.9, 0.99, 1.0 + 1e-9)  # confidence bins of the calibration table, [lo, hi)
KINDS = ("fallback", "above τ, alone", "above τ, joint")


class Judge:
    """The ``greedy_decode`` observer: keeps every problem's answer state and its count of agreeing phrasings, and
    records each fill (q, π, fallback) and each answer's first death."""

    def __init__(self, phrasings: list[Phrasings], layout: Layout, tau: float) -> None:
        self.phrasings, self.layout, self.tau = phrasings, layout, tau
        self.state = [[FREE] * layout.answer_len for _ in phrasings]
        self.alive = [ph.count(s) for ph, s in zip(phrasings, self.state, strict=True)]  # agreeing phrasings
        self.fills: list[tuple[float, float, bool]] = []  # (q, π, fallback) of every fill made on a live state
        self.death: dict[int, dict] = {}  # problem -> its first death

    def __call__(self, rows: Tensor, start: int, block: Tensor, fill: Tensor, tok: Tensor, conf: Tensor) -> None:
        offset = start - self.layout.max_prompt  # answer index of the block's first position
        for r, i in enumerate(rows.tolist()):
            where = fill[r].nonzero().flatten().tolist()
            before, count = self.state[i], self.alive[i]
            after = list(before)
            for j in where:
                after[offset + j] = int(tok[r, j])
            self.state[i] = after
            if count == 0:  # dead already: nothing after the first death is judged
                continue
            fallback = len(where) == 1 and float(conf[r, where[0]]) <= self.tau
            dead_alone, alone = [], 0
            for j in where:
                one = list(before)
                one[offset + j] = int(tok[r, j])
                alone = self.phrasings[i].count(one)
                self.fills.append((float(conf[r, j]), alone / count, fallback))
                if alone == 0:
                    dead_alone.append(j)
            self.alive[i] = alone if len(where) == 1 else self.phrasings[i].count(after)  # one fill: `one` is `after`
            if self.alive[i] == 0:
                kind = KINDS[0] if fallback else KINDS[1] if dead_alone else KINDS[2]
                j = dead_alone[0] if dead_alone else max(where)
                leftmost = int((block[r] == self.layout.mask_id).float().argmax())
                self.death[i] = {"kind": kind, "q": float(conf[r, j]), "ahead": j - leftmost}


@torch.no_grad()
def judge(model: Transformer, problems: list[task.Problem], encode, decode, layout: Layout, tau: float) -> dict:  # noqa: ANN001
    """Decode ``problems`` with threshold τ under the judge; the calibration bins, the deaths and the scorer check."""
    model.eval()
    phrasings = [Phrasings(p, encode, layout.end_id, layout.answer_len) for p in problems]
    j = Judge(phrasings, layout, tau)
    outs, forwards = greedy_decode(model, problems, encode, layout, tau, observe=j)
    texts = [decode(o) for o in outs]
    right = [task.extract_answer(t) == p.answer for t, p in zip(texts, problems, strict=True)]
    formed = [parse(t) for t in texts]
    named = [set(t.split()) & set(task.NAMES) for t in texts]  # the people an answer names
    bins = []
    for lo, hi in zip(BINS, BINS[1:], strict=False):
        got = [(q, pi, fb) for q, pi, fb in j.fills if lo <= q < hi]
        n = max(len(got), 1)
        bins.append(
            {
                "q": [lo, min(hi, 1.0)],
                "fills": len(got),
                "fallback": sum(fb for _, _, fb in got),
                "mean_q": sum(q for q, _, _ in got) / n,
                "mean_pi": sum(pi for _, pi, _ in got) / n,
                "dead": sum(pi == 0 for _, pi, _ in got) / n,
            }
        )
    fatal = [d for i, d in j.death.items() if not (right[i] and formed[i])]
    live = [i for i in range(len(problems)) if i not in j.death]
    return {
        "tau": tau,
        "n": len(problems),
        "right": sum(right) / len(problems),
        "wellformed": sum(formed) / len(problems),
        "tpf": sum(len(o) for o in outs) / max(sum(forwards), 1),
        "died": len(j.death) / len(problems),
        "fatal": {k: sum(d["kind"] == k for d in fatal) for k in KINDS},
        "fatal_q_median": median(d["q"] for d in fatal) if fatal else None,
        "fatal_ahead_median": median(d["ahead"] for d in fatal) if fatal else None,
        "died_scored_right": len(j.death) - len(fatal),
        "live_but_wrong": sum(not (right[i] and formed[i]) for i in live),
        "named": sum(bool(n) for n in named),
        "wrong_name": sum(bool(n - {p.name}) for n, p in zip(named, problems, strict=True)),
        "bins": bins,
    }


@torch.no_grad()
def copy_probe(model: Transformer, problems: list[task.Problem], encode, tok_id, layout: Layout) -> dict:  # noqa: ANN001
    """Mean probability of the right name, and of the right item, at the closing ``{name} has {r} {item} now.`` of
    the reference answers that end with it, every other answer position given (module docstring); ``any_name``: the
    mean probability of all the task's names together at the name's position."""
    chosen = [p for p in problems if task.CLOSINGS[p.wording[-1]].startswith("{name}")]
    if not chosen:
        return {"problems": 0}
    ids, positions, valid = encode_rows(chosen, encode, layout)  # (n, L): prompt + reference answer
    p0 = layout.max_prompt
    idx = answer_logits_idx(len(chosen), layout)  # (n, answer_len): Dream's shift
    out = {"problems": len(chosen)}
    for what in ("name", "item"):
        x, where, want = ids.clone(), [], []
        for r, p in enumerate(chosen):
            t = tok_id(p.name if what == "name" else p.item)
            k = max(i for i, v in enumerate(ids[r, p0:].tolist()) if v == t)  # its last use: the closing
            x[r, p0 + k] = layout.mask_id
            where.append(k)
            want.append(t)
        probs = model(x, positions, attn_mask=block_causal_mask(valid, layout), logits_idx=idx).float().softmax(-1)
        out[what] = sum(float(probs[r, k, t]) for r, (k, t) in enumerate(zip(where, want, strict=True))) / len(chosen)
        if what == "name":
            names = torch.tensor([tok_id(n) for n in task.NAMES])
            out["any_name"] = sum(float(probs[r, k, names].sum()) for r, k in enumerate(where)) / len(chosen)
    return out


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _print(path: Path, r: dict) -> None:
    print(
        f"\n{path}, τ {r['tau']}: right {100 * r['right']:.1f}%, well-formed {100 * r['wellformed']:.1f}%, "
        f"TPF {r['tpf']:.2f}; died {100 * r['died']:.1f}%, of them scored right {r['died_scored_right']}; "
        "fatal deaths: "
        + ", ".join(f"{k} {v}" for k, v in r["fatal"].items())
        + f" (median q {_num(r['fatal_q_median'])}, median ahead {_num(r['fatal_ahead_median'])}); live but wrong "
        f"{r['live_but_wrong']}; answers naming a person {r['named']}, the wrong one {r['wrong_name']}"
    )
    print("| q | fills | of them fallback | mean q | mean π | dead % |")
    print("|---|---|---|---|---|---|")
    for b in r["bins"]:
        lo, hi = b["q"]
        print(
            f"| {lo:.2f}–{hi:.2f} | {b['fills']} | {b['fallback']} | {b['mean_q']:.3f} | {b['mean_pi']:.3f} | "
            f"{100 * b['dead']:.2f} |"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", type=Path, help="tiny Dream checkpoint directories")
    p.add_argument("--n", type=int, default=600, help="problems (default: 600)")
    p.add_argument("--split", choices=task.SPLITS, default="test", help="problem split (default: test)")
    p.add_argument("--tau", type=float, nargs="+", default=[0.9], help="thresholds (default: 0.9)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error("--n must be >= 1")
    if any(not 0.0 < t < 1.0 for t in args.tau):
        p.error("every --tau must be in (0, 1)")
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = build_tokenizer()
    encode, decode = text_codec(tok)
    problems = task.fixed_set(args.split, args.n)
    print(f"{len(problems)} {args.split} problems")
    results: dict[str, list[dict]] = {}
    for path in args.models:
        ckpt = load_checkpoint(path)
        layout = Layout.of_checkpoint(ckpt.generation_config, special_ids(tok))
        results[str(path)] = []
        probe = copy_probe(ckpt.model.eval(), problems, encode, tok.token_to_id, layout)
        print(
            f"\n{path}: copy probe on {probe['problems']} reference answers: p(right name) "
            f"{probe.get('name', float('nan')):.3f} (p(any name) {probe.get('any_name', float('nan')):.3f}), "
            f"p(right item) {probe.get('item', float('nan')):.3f}"
        )
        for tau in args.tau:
            r = judge(ckpt.model, problems, encode, decode, layout, tau) | {"copy_probe": probe}
            results[str(path)].append(r)
            _print(path, r)
    print(json.dumps({"n": len(problems), "split": args.split, "models": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
