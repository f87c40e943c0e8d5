"""Branch-parallel time split: where an iteration's time goes with 1 and 2 ranks (and in one process).

For each world size, starts the ranks once, decodes a few prompts with LoPA, and divides each phase's total
time by the number of iterations (forwards): forward and scoring (rank 0's own compute), all_gather (scores;
includes waiting for the slowest rank), broadcast (the winner's prediction) and kv_broadcast (the committed
K/V span + last logit). On CPU with gloo the numbers only show that the communication terms are measured and
how big they are next to compute; they say nothing about GPUs.

    python bench/bp.py                      # bundled model if present, else a tiny random checkpoint
    python bench/bp.py --model DIR --world-sizes 1,2,4 --branches 3

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from lopa import LLM, DecodeConfig
from lopa.dist.launch import BranchParallelGroup
from lopa.outputs import Completion

PHASES = ("forward", "scoring", "all_gather", "broadcast", "kv_broadcast")
PROMPTS = [
    "Tom has 3 apples and buys 4 more. How many apples does he have?",
    "Write a function that returns the sum of a list.",
    "A train travels 60 km in 1.5 hours. What is its speed?",
    "List three prime numbers greater than 10.",
]


def checkpoint(arg: str | None) -> Path:
    """The given checkpoint, else the bundled model, else a tiny random one (written to a temp dir)."""
    if arg:
        return Path(arg)
    from lopa.tiny import default_checkpoint_dir

    bundled = default_checkpoint_dir()
    if (bundled / "config.json").exists():
        return bundled
    from lopa.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "bp-bench-tiny", hidden_size=128, num_layers=4, seed=0)


def split(completions: list[Completion]) -> dict[str, float]:
    """Milliseconds per iteration for each phase, plus totals and throughput."""
    forwards = sum(c.stats.forwards for c in completions)
    out = {p: 1e3 * sum(c.stats.timing.get(p, 0.0) for c in completions) / forwards for p in PHASES}
    seconds = sum(c.stats.seconds for c in completions)
    out["comm"] = out["all_gather"] + out["broadcast"] + out["kv_broadcast"]
    out["iteration"] = 1e3 * seconds / forwards
    out["forwards"] = forwards
    out["tokens"] = sum(c.stats.tokens for c in completions)
    out["tok_s"] = out["tokens"] / seconds if seconds else 0.0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--world-sizes", default="1,2")
    ap.add_argument("--branches", type=int, default=3)
    ap.add_argument("--block-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (and for the 1-process row)")
    args = ap.parse_args()
    model = checkpoint(args.model)
    cfg = DecodeConfig(
        decoder="lopa", base="threshold", branches=args.branches, block_size=args.block_size,
        max_new_tokens=args.max_new_tokens, threshold=args.threshold,
    )  # fmt: skip
    rows: dict[str, dict[str, float]] = {}

    torch.set_num_threads(args.threads)
    llm = LLM(model)
    llm.generate(PROMPTS[0], cfg)  # warm-up
    rows["1 process"] = split(llm.generate(PROMPTS, cfg))
    for world in (int(w) for w in args.world_sizes.split(",")):
        t0 = time.perf_counter()
        with BranchParallelGroup(world, model, threads=args.threads) as group:
            started = time.perf_counter() - t0
            group.generate(PROMPTS[0], cfg)  # warm-up
            rows[f"bp N={world}"] = split(group.generate(PROMPTS, cfg))
            rows[f"bp N={world}"]["startup_s"] = started

    print(
        f"model={model.name} device=cpu dtype=float32 backend=gloo decoder=lopa base=threshold k={args.branches} "
        f"block={args.block_size} tau={args.threshold} max_new_tokens={args.max_new_tokens} threads/rank={args.threads}"
    )
    cols = " ".join(f"{p:>12}" for p in PHASES)
    head = f"{'run':<10} {'iters':>5} {cols} {'comm':>8} {'iter':>8} {'tok/s':>7}"
    print(head + "\n" + "-" * len(head))
    for name, r in rows.items():
        cells = " ".join(f"{r[p]:>12.3f}" for p in PHASES)
        print(f"{name:<10} {r['forwards']:>5} {cells} {r['comm']:>8.3f} {r['iteration']:>8.3f} {r['tok_s']:>7.1f}")
    print("(ms per iteration; iter = wall time per iteration on rank 0, comm = all_gather + broadcast + kv_broadcast)")
    meta = {"model": model.name, "cpu": platform.processor() or platform.machine(), "settings": cfg.to_dict()}
    print(json.dumps({"bench": "bp", **meta, "rows": rows}))


if __name__ == "__main__":
    main()
