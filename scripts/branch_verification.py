"""Does LoPA's verification tell a dead branch from a live one? One LoPA step over threshold, replayed on every
state that the model's own threshold decoding visits, with the task's exact posterior as the judge.

For each state (``lopa.tiny.trajectory.visit``, threshold order, the model's own tokens, validation problems):
one forward gives the anchor fill (τ, else the most confident position of the window) and the k lookahead
branches (the anchor plus the model's token at the j-th most confident remaining position, j = 1..k); a second,
batched forward scores every candidate by the mean confidence of its window's remaining masked positions (1.0 when
none is left), and the winner is the best score (ties: lookahead branches in creation order, the anchor last), as
in docs/algorithm.md §3.4. A candidate is *live* when some phrasing of the problem agrees with its fixed positions
(``lopa.tiny.posterior``), *dead* when none does: no correct answer can follow it. A step is *contested* when it
has both; its anchor is then live, since every branch extends the anchor (a dead anchor leaves only dead
candidates). Reported per model: the contested steps and how often the winner is dead there, i.e. how often one
LoPA step breaks an answer that threshold's own fill would have kept. Full-row forwards under the
training layout (block-causal, the engine's KV cache aside); prints a table, then one JSON line.

    python scripts/branch_verification.py lopa/tiny/checkpoint runs/tiny-ft-s1 --n 48 --k 8
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
from torch import Tensor

from lopa.checkpoint.loader import load_checkpoint
from lopa.model.transformer import Transformer
from lopa.tiny import task
from lopa.tiny.data import Layout, block_causal_mask, encode_rows
from lopa.tiny.posterior import Phrasings
from lopa.tiny.train_loop import text_codec
from lopa.tiny.trajectory import confidence, fixed_positions, visit
from lopa.tiny.vocab import build_tokenizer, special_ids

THRESHOLD = 0.9
CHUNK = 256  # rows per forward


@torch.no_grad()
def _confidence(
    model: Transformer, ids: Tensor, positions: Tensor, valid: Tensor, layout: Layout
) -> tuple[Tensor, Tensor]:
    """(rows, answer_len) probability of the most likely non-mask token, and that token (the trajectories' own
    confidence, ``trajectory.confidence``), in forwards of CHUNK rows under the training layout."""
    chunks = [slice(i, i + CHUNK) for i in range(0, ids.shape[0], CHUNK)]
    parts = [confidence(model, ids[c], positions[c], block_causal_mask(valid[c], layout), layout) for c in chunks]
    return torch.cat([c for c, _ in parts]), torch.cat([t for _, t in parts])


def _window(masked: Tensor, layout: Layout) -> Tensor:
    """(rows, answer_len) bool: the first answer block that still has masks (threshold's window)."""
    blocks = masked.view(masked.shape[0], layout.num_blocks, layout.block_size).any(-1)  # (rows, nb)
    first = blocks.float().argmax(1)  # (rows,)
    return (torch.arange(layout.answer_len)[None] // layout.block_size) == first[:, None]


def verify(model: Transformer, problems: list[task.Problem], encode, layout: Layout, k: int) -> dict:  # noqa: ANN001
    """Replay one LoPA step on every visited state; count contested steps and dead winners (module docstring)."""
    phrasings = [Phrasings(p, encode, layout.end_id, layout.answer_len) for p in problems]
    rows = encode_rows(problems, encode, layout)
    pool = visit(model, *rows, layout, "threshold", THRESHOLD, phrasings=phrasings, rng=random.Random(0))
    prompt_of = {tuple(rows[0][i, : layout.max_prompt].tolist()): i for i in range(len(problems))}
    p = layout.max_prompt
    ids = pool.clean.clone()
    ids[:, p:][pool.masks] = layout.mask_id
    conf, tok = _confidence(model, ids, pool.positions, pool.valid, layout)  # (states, answer_len)
    open_ = _window(pool.masks, layout) & pool.masks
    fill = open_ & (conf > THRESHOLD)
    top = torch.where(open_, conf, torch.full_like(conf, -1.0)).argmax(1)  # (states,)
    none = ~fill.any(1)
    fill[none, top[none]] = True
    anchor = torch.where(fill, tok, ids[:, p:])  # (states, answer_len)
    rest = open_ & ~fill
    ranked = torch.sort(torch.where(rest, conf, torch.full_like(conf, -1.0)), stable=True, dim=1, descending=True)
    cand, owner = [], []  # candidate answers, and the state each belongs to: branches j = 1..k, then the anchor
    for s in range(len(pool)):
        for j in range(min(k, int(rest[s].sum()))):
            branch = anchor[s].clone()
            pos = int(ranked.indices[s, j])
            branch[pos] = tok[s, pos]
            cand.append(branch)
            owner.append(s)
        cand.append(anchor[s])
        owner.append(s)
    answers = torch.stack(cand)  # (candidates, answer_len)
    who = torch.tensor(owner)
    full = torch.cat([pool.clean[who, :p], answers], 1)
    c_conf, _ = _confidence(model, full, pool.positions[who], pool.valid[who], layout)
    left = _window(answers == layout.mask_id, layout) & (answers == layout.mask_id)
    score = torch.where(left.any(1), (c_conf * left).sum(1) / left.sum(1).clamp_min(1), torch.ones(len(cand)))
    live = []
    for c, s in zip(answers, owner, strict=True):
        live.append(phrasings[prompt_of[tuple(pool.clean[s, :p].tolist())]].count(fixed_positions(c, layout)) > 0)
    live_t = torch.tensor(live)
    steps = contested = dead_wins = 0
    for s in range(len(pool)):
        mine = (who == s).nonzero().flatten()
        steps += 1
        alive = live_t[mine]
        if alive.all() or not alive.any():
            continue
        contested += 1
        sc = score[mine]
        dead_wins += not bool(alive[int(sc.argmax())])  # argmax: the first best, i.e. lookahead first, anchor last
    return {
        "states": steps,
        "candidates": len(cand),
        "dead_candidates": int((~live_t).sum()),
        "contested": contested,
        "dead_winner": dead_wins / max(contested, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", type=Path, help="tiny Dream checkpoint directories")
    p.add_argument("--n", type=int, default=48, help="validation problems (default: 48)")
    p.add_argument("--k", type=int, default=8, help="lookahead branches (default: 8)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    args = p.parse_args(argv)
    if args.n < 1 or args.k < 1:
        p.error("--n and --k must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = build_tokenizer()
    ids = special_ids(tok)
    encode, _ = text_codec(tok)
    problems = task.fixed_set("validation", args.n)
    print(f"{len(problems)} validation problems, LoPA over threshold τ {THRESHOLD}, k = {args.k}")
    print("| model | states | candidates (dead) | contested steps | dead winner |")
    print("|---|---|---|---|---|")
    results = {}
    for path in args.models:
        ckpt = load_checkpoint(path)
        layout = Layout.of_checkpoint(ckpt.generation_config, ids)
        r = verify(ckpt.model.eval(), problems, encode, layout, args.k)
        results[str(path)] = r
        print(
            f"| {path} | {r['states']} | {r['candidates']} ({r['dead_candidates']}) | {r['contested']} | "
            f"{100 * r['dead_winner']:.1f}% |",
            flush=True,
        )
    print(json.dumps({"n": len(problems), "k": args.k, "threshold": THRESHOLD, "models": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
