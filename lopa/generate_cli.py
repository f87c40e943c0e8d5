"""``lopa generate``: decode prompts and print the text plus a one-line stats summary (or JSON lines)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from lopa.cli import add_decode_arguments, add_model_arguments, decode_config_from_args, load_llm
from lopa.dist.launch import add_dist_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="*", help="prompt text(s); read one per line from stdin when none are given")
    add_model_arguments(p)
    p.add_argument("--raw", action="store_true", help="do not apply the chat template to the prompts")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt instead of text")
    p.add_argument("--branch-parallel", action="store_true", help="run as one rank of a torchrun launch")
    p.add_argument("--bp", type=int, default=0, metavar="N", help="launch N branch-parallel ranks on this machine")
    add_dist_arguments(p)
    add_decode_arguments(p)


def summary(stats: dict, cfg_line: str) -> str:
    return (
        f"[{cfg_line}] tokens={stats['tokens']} forwards={stats['forwards']} tpf={stats['tpf']:.2f} "
        f"tpf_paper={stats['tpf_paper']:.2f} {stats['tokens_per_second']:.1f} tok/s latency={stats['seconds']:.2f}s"
    )


def describe(cfg) -> str:
    """The settings that matter for a decoder, for headers and summaries."""
    parts = [cfg.decoder]
    if cfg.decoder == "lopa":
        parts.append(f"base={cfg.base} k={cfg.branches}")
    if cfg.decoder == "vanilla":
        parts.append(f"order={cfg.order}")
    else:
        parts.append(f"block={cfg.block_size} tau={cfg.threshold}")
    if cfg.base_decoder == "d2f" and cfg.decoder != "vanilla":
        parts.append(f"tau_add={cfg.tau_add} tau_act={cfg.tau_act}")
    return " ".join(parts)


def run(args: argparse.Namespace) -> int:
    cfg = decode_config_from_args(args)
    worker_rank = args.branch_parallel and os.environ.get("RANK", "0") != "0"  # gets its prompts from rank 0
    prompts = args.prompts or ([] if worker_rank else [line.rstrip("\n") for line in sys.stdin if line.strip()])
    if not prompts and not worker_rank:
        print("lopa generate: no prompt given", file=sys.stderr)
        return 2
    if args.bp or args.branch_parallel:
        from lopa.cli import check_branch_parallel_batch
        from lopa.dist.launch import run_generate

        check_branch_parallel_batch(args)

        return run_generate(args, cfg, prompts)
    llm = load_llm(args)
    for completion in llm.generate(prompts, cfg, raw=args.raw):
        emit(completion, cfg, args.json, llm)
    return 0


def emit(completion, cfg, as_json: bool, llm=None) -> None:
    stats = completion.stats.to_dict()
    if as_json:
        d = completion.to_dict()
        d["settings"] = cfg.to_dict()
        if llm is not None:
            d["device"], d["dtype"] = str(llm.device), str(next(llm.model.parameters()).dtype).replace("torch.", "")
        print(json.dumps(d), flush=True)
    else:
        print(completion.text, flush=True)
        print(summary(stats, describe(cfg)), file=sys.stderr, flush=True)
