"""What a tiny Dream model knows against the order it fills in: the same model under three greedy orders.

Runs the reference loop of ``lopa.tiny.evaluate`` (full-row forwards under the training layout, blocks of 32) with
three fill rules on the same problems (the one-per-forward rules fill every block to its end, so only threshold's
tokens per forward are shown):

- ``threshold``: τ 0.9, else the single most confident position (the bundled model's default decoder);
- ``confidence``: exactly one position per forward, the most confident one (the order threshold mostly follows:
  its TPF on the bundled model is about 1.4);
- ``left-to-right``: exactly one position per forward, the leftmost masked one, with its most likely token.

When left-to-right is right and the confidence order is not, the model knows every next token but picks a bad
order of filling: its errors are commits made ahead of what they depend on. Prints a table, then one JSON line.

    python scripts/decoding_order.py lopa/tiny/checkpoint runs/tiny-v3-s1/best --n 600
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from lopa.checkpoint.loader import load_checkpoint
from lopa.tiny import task
from lopa.tiny.data import Layout
from lopa.tiny.evaluate import score
from lopa.tiny.train_loop import text_codec
from lopa.tiny.vocab import build_tokenizer, special_ids

RULES = {"threshold": (0.9, "confidence"), "confidence": (2.0, "confidence"), "left-to-right": (2.0, "left-to-right")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", type=Path, help="tiny Dream checkpoint directories")
    p.add_argument("--n", type=int, default=600, help="problems (default: 600)")
    p.add_argument("--split", choices=task.SPLITS, default="test", help="problem split (default: test)")
    p.add_argument("--problem-seed", type=int, default=None, help="a fresh set drawn from this seed (task.fresh_set)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error("--n must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = build_tokenizer()
    ids = special_ids(tok)
    encode, decode = text_codec(tok)
    if args.problem_seed is None:
        problems = task.fixed_set(args.split, args.n)
    else:
        problems = task.fresh_set(args.split, args.n, args.problem_seed)
    results = {}
    fresh = f" (fresh, seed {args.problem_seed})" if args.problem_seed is not None else ""
    print(f"{len(problems)} {args.split} problems{fresh}")
    print("| model | threshold TPF | " + " | ".join(f"{r}: exact / well-formed %" for r in RULES) + " |")
    print("|---|---|" + "---|" * len(RULES))
    for path in args.models:
        ckpt = load_checkpoint(path, device=args.device)
        layout = Layout.of_checkpoint(ckpt.generation_config, ids)
        row = {}
        for rule, (threshold, order) in RULES.items():
            row[rule] = score(ckpt.model, problems, encode, decode, layout, threshold=threshold, order=order)
        results[str(path)] = row
        cells = [f"{100 * r['accuracy']:.1f} / {100 * r['wellformed']:.1f}" for r in row.values()]
        print(f"| {path} | {row['threshold']['tpf']:.2f} | " + " | ".join(cells) + " |", flush=True)
    print(json.dumps({"n": len(problems), "split": args.split, "problem_seed": args.problem_seed, "models": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
