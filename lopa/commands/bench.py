"""``lopa bench``: the decoders side by side on held-out problems of the bundled task (:mod:`lopa.tiny.bench`)."""

from __future__ import annotations

import argparse

from lopa.commands.flags import add_dist_arguments, add_model_arguments, add_tp_argument, load_llm, local_model_arg
from lopa.tiny.bench_sweep import FULL, FULL_N, QUICK, QUICK_N


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument(
        "--n",
        type=int,
        default=None,
        help=f"held-out test problems per decoder (default: {QUICK_N}; {FULL_N} with --full)",
    )
    p.add_argument(
        "--problem-seed",
        type=int,
        default=None,
        metavar="S",
        help="a fresh test set drawn from seed S (none of the fixed set's first 600 problems) instead of the fixed one",
    )
    p.add_argument(
        "--full", action="store_true", help=f"the complete sweep: all {len(FULL)} decoder rows (default: {len(QUICK)})"
    )
    p.add_argument("--decoders", nargs="+", default=None, metavar="NAME", help="subset of: " + " ".join(FULL))
    p.add_argument("--plot", default=None, metavar="PNG", help="write accuracy vs TPF, one curve per family")
    p.add_argument("--block-size", type=int, default=None, help="default: the checkpoint's generation_config")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the checkpoint's generation_config")
    p.add_argument("--json-only", action="store_true", help="print only the JSON line")
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: the tiny model gains nothing from more)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        metavar="N",
        help="processes the decoders are spread over (default 0: one per CPU core on CPU, 1 on CUDA or with --bp/--tp)",
    )
    p.add_argument("--emit-answers", action="store_true", help=argparse.SUPPRESS)  # a worker's rows carry answers
    p.add_argument("--bp", type=int, default=0, metavar="N", help="decode with N branch-parallel ranks")
    add_tp_argument(p)
    add_dist_arguments(p)


def run(args: argparse.Namespace) -> int:
    from lopa.tiny.bench import run as run_bench

    return run_bench(args, load_llm=lambda: load_llm(args), local_model=lambda: local_model_arg(args))
