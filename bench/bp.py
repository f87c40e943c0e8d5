"""BP x TP time split: where an iteration's time goes on each mesh (and in one process).

For each mesh ``bp x tp`` (branch groups x tensor-parallel ranks), starts the ranks once, decodes a few prompts
with LoPA, and divides each phase's total time by the number of iterations (forwards): forward and scoring
(rank 0's own compute, all-reduce time taken out), all_reduce (the 2 per layer of tensor parallelism; includes
waiting for the slower TP peer), all_gather (scores; includes waiting for the slowest branch group), broadcast
(the winner's prediction) and kv_broadcast (the committed K/V shard span + last logit). On CPU with gloo the
numbers only show that every communication term is measured and how big it is next to compute; they say
nothing about GPUs. With ``--device cuda`` the same script runs the mesh on NCCL (one GPU per rank).

    python bench/bp.py                      # bundled model if present, else a random checkpoint
    python bench/bp.py --model DIR --mesh 1x1,1x2,2x1,2x2,2x4 --branches 3

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
from lopa.engine.output import Completion
from lopa.parallel.launch import BranchParallelGroup

PHASES = ("forward", "all_reduce", "scoring", "all_gather", "broadcast", "kv_broadcast")
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
    from lopa.checkpoint.bundled import default_checkpoint_dir

    bundled = default_checkpoint_dir()
    if (bundled / "config.json").exists():
        return bundled
    from lopa.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(
        Path(tempfile.mkdtemp()) / "bp-bench-random", hidden_size=256, num_layers=4, intermediate_size=1024, seed=0
    )


def split(completions: list[Completion]) -> dict[str, float]:
    """Milliseconds per iteration for each phase, plus totals and throughput."""
    forwards = sum(c.stats.forwards for c in completions)
    out = {p: 1e3 * sum(c.stats.timing.get(p, 0.0) for c in completions) / forwards for p in PHASES}
    seconds = sum(c.stats.seconds for c in completions)
    out["comm"] = out["all_reduce"] + out["all_gather"] + out["broadcast"] + out["kv_broadcast"]
    out["iteration"] = 1e3 * seconds / forwards
    out["forwards"] = forwards
    out["tokens"] = sum(c.stats.tokens for c in completions)
    out["tok_s"] = out["tokens"] / seconds if seconds else 0.0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--mesh", default="1x1,1x2,2x1,2x2", help="comma-separated BPxTP meshes")
    ap.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per rank)")
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
    llm = LLM(model, device=args.device)
    llm.generate(PROMPTS[0], cfg)  # warm-up
    rows["1 process"] = split(llm.generate(PROMPTS, cfg))
    for mesh in args.mesh.split(","):
        bp, tp = (int(x) for x in mesh.lower().split("x"))
        t0 = time.perf_counter()
        with BranchParallelGroup(bp, model, tp=tp, threads=args.threads, device=args.device) as group:
            started = time.perf_counter() - t0
            group.generate(PROMPTS[0], cfg)  # warm-up
            rows[f"{bp}x{tp}"] = split(group.generate(PROMPTS, cfg))
            rows[f"{bp}x{tp}"]["startup_s"] = started

    print(
        f"model={model.name} device={args.device} backend={'nccl' if args.device.startswith('cuda') else 'gloo'} "
        f"decoder=lopa base=threshold k={args.branches} "
        f"block={args.block_size} tau={args.threshold} max_new_tokens={args.max_new_tokens} threads/rank={args.threads}"
    )
    cols = " ".join(f"{p:>12}" for p in PHASES)
    head = f"{'bp x tp':<10} {'iters':>5} {cols} {'comm':>8} {'iter':>8} {'tok/s':>7}"
    print(head + "\n" + "-" * len(head))
    for name, r in rows.items():
        cells = " ".join(f"{r[p]:>12.3f}" for p in PHASES)
        print(f"{name:<10} {r['forwards']:>5} {cells} {r['comm']:>8.3f} {r['iteration']:>8.3f} {r['tok_s']:>7.1f}")
    print("(ms per iteration on rank 0; iter = wall time; comm = all_reduce + all_gather + broadcast + kv_broadcast)")
    meta = {"model": model.name, "cpu": platform.processor() or platform.machine(), "settings": cfg.to_dict()}
    print(json.dumps({"bench": "bp", **meta, "rows": rows}))


if __name__ == "__main__":
    main()
