"""``lopa bench``: every decoder side by side on held-out problems of the bundled task.

Prints one table (decoder, settings, accuracy, tpf, tpf_paper, forwards/sample, tok/s, latency, agreement of final
answers with threshold τ=0.9), then one JSON line with the same numbers plus device, dtype and versions.
``--plot`` writes TPF vs branches and accuracy vs TPF. The problems are the test split's fixed set, so every
run and every decoder sees the same ones.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lopa.cli import add_model_arguments, load_llm
from lopa.config import DecodeConfig
from lopa.dist.launch import BranchParallelGroup, add_dist_arguments, resolve_timeout

BRANCHES = (1, 2, 4, 8)


@dataclass
class Row:
    name: str
    settings: str
    accuracy: float
    tpf: float
    tpf_paper: float
    forwards: float
    tok_s: float
    latency: float
    agreement: float | None  # None when threshold was not run
    branches: int
    base: str
    score: str

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def variants(block_size: int, max_new_tokens: int) -> dict[str, DecodeConfig]:
    """Name → DecodeConfig of every decoder the bench knows, in table order."""
    common = DecodeConfig(block_size=block_size, max_new_tokens=max_new_tokens, threshold=0.9)
    out = {
        "vanilla": common.replace(decoder="vanilla"),
        "threshold": common.replace(decoder="threshold"),
        "threshold@0.7": common.replace(decoder="threshold", threshold=0.7),
        "threshold+1": common.replace(decoder="threshold", extra_fill=1),
        "d2f": common.replace(decoder="d2f"),
    }
    for base in ("threshold", "d2f"):
        for score in ("mean", "shared"):
            for k in BRANCHES:
                suffix = "" if score == "mean" else "-shared"
                out[f"lopa-{base}-k{k}{suffix}"] = common.replace(
                    decoder="lopa", base=base, branches=k, branch_score=score
                )
    return out


DEFAULT = ["vanilla", "threshold", "threshold@0.7", "threshold+1", "d2f"] + [
    f"lopa-{b}-k{k}{s}" for b in ("threshold", "d2f") for s in ("", "-shared") for k in BRANCHES
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--n", type=int, default=60, help="held-out test problems per decoder (default: 60)")
    p.add_argument("--decoders", nargs="+", default=None, metavar="NAME", help="subset of: " + " ".join(DEFAULT))
    p.add_argument("--plot", default=None, metavar="PNG", help="write TPF vs branches and accuracy vs TPF")
    p.add_argument("--block-size", type=int, default=None, help="default: the checkpoint's generation_config")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the checkpoint's generation_config")
    p.add_argument("--json-only", action="store_true", help="print only the JSON line")
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: the tiny model gains nothing from more)"
    )
    p.add_argument("--bp", type=int, default=0, metavar="N", help="decode with N branch-parallel ranks")
    add_dist_arguments(p)


def settings_of(cfg: DecodeConfig) -> str:
    from lopa.generate_cli import describe

    extra = " +1" if cfg.extra_fill else ""
    shared = " score=shared" if cfg.decoder == "lopa" and cfg.branch_score == "shared" else ""
    return describe(cfg) + extra + shared


def run(args: argparse.Namespace) -> int:
    from lopa.errors import ConfigError
    from lopa.tiny.task import fixed_set

    if args.n < 1:
        raise ConfigError(f"--n must be >= 1 (problems per decoder), got {args.n}")
    torch.set_num_threads(max(1, args.threads))
    llm = load_llm(args)
    gen = llm.checkpoint.generation_config
    block = args.block_size or int(gen.get("block_size", 8))
    max_new = args.max_new_tokens or int(gen.get("max_new_tokens", 4 * block))
    table = variants(block, max_new)
    names = args.decoders or DEFAULT
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ConfigError(f"unknown bench decoder(s) {unknown}; choose from {list(table)}")
    problems = fixed_set("test", args.n)
    prompts = [p.prompt for p in problems]
    with contextlib.ExitStack() as stack:
        if args.bp:
            group = BranchParallelGroup(
                args.bp,
                args.model,
                lora=args.lora,
                device=args.device,
                dtype=args.dtype,
                timeout_s=resolve_timeout(args.dist_timeout),
                port=args.dist_port,
            )
            generate = stack.enter_context(group).generate
        else:
            generate = functools.partial(llm.generate, progress=not args.json_only)
        rows = _measure(generate, names, table, problems, prompts, args)
    order = {n: i for i, n in enumerate(names)}
    rows.sort(key=lambda r: order[r.name])
    dtype = str(next(llm.model.parameters()).dtype).replace("torch.", "")
    header = {
        "model": llm.model_name,
        "n": len(problems),
        "device": str(llm.device),
        "dtype": dtype,
        "block_size": block,
        "max_new_tokens": max_new,
        "bp": args.bp,  # branch-parallel ranks (0: one process)
    }
    if not args.json_only:
        print(format_table(rows, header))
    if args.plot:
        from lopa.tiny.plots import plot_bench

        plot_bench(rows, Path(args.plot))
        if not args.json_only:
            print(f"plot written to {args.plot}")
    versions = {"lopa": _version(), "torch": torch.__version__, "python": platform.python_version()}
    print(json.dumps({"bench": "tiny", **header, "versions": versions, "rows": [r.as_dict() for r in rows]}))
    return 0


def _measure(generate, names: list[str], table: dict[str, DecodeConfig], problems, prompts, args) -> list[Row]:
    """Run every named decoder on the prompts; threshold first, as the agreement baseline."""
    from lopa.tiny.task import extract_answer

    reference: list[int | None] | None = None
    rows: list[Row] = []
    for name in sorted(names, key=lambda n: n != "threshold"):  # threshold first: it is the agreement baseline
        cfg = table[name]
        t0 = time.perf_counter()
        outs = generate(prompts, cfg, raw=True)
        wall = time.perf_counter() - t0
        answers = [extract_answer(o.text) for o in outs]
        if name == "threshold":
            reference = answers
        tokens = sum(o.stats.tokens for o in outs)
        forwards = sum(o.stats.forwards for o in outs)
        seconds = sum(o.stats.seconds for o in outs)
        n = len(outs)
        rows.append(
            Row(
                name=name,
                settings=settings_of(cfg),
                accuracy=sum(a == p.answer for a, p in zip(answers, problems, strict=True)) / n,
                tpf=tokens / forwards,
                tpf_paper=sum(o.stats.tpf_paper for o in outs) / n,
                forwards=forwards / n,
                tok_s=tokens / seconds if seconds else 0.0,
                latency=seconds / n,
                agreement=(sum(a == b for a, b in zip(answers, reference, strict=True)) / n if reference else None),
                branches=cfg.num_branches,
                base=cfg.base_decoder,
                score=cfg.branch_score if cfg.decoder == "lopa" else "",
            )
        )
        if not args.json_only:
            print(f"  {name}: {wall:.1f}s", file=sys.stderr)
    return rows


def format_table(rows: list[Row], header: dict) -> str:
    head = " ".join(f"{k}={v}" for k, v in header.items())
    cols = ("decoder", "settings", "acc", "tpf", "tpf_paper", "fwd/sample", "tok/s", "latency", "agree")
    lines = [f"lopa bench: {head}", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        agree = "-" if r.agreement is None else f"{100 * r.agreement:.0f}%"
        lines.append(
            f"| {r.name} | {r.settings} | {100 * r.accuracy:.1f}% | {r.tpf:.2f} | {r.tpf_paper:.2f} | "
            f"{r.forwards:.1f} | {r.tok_s:.0f} | {1000 * r.latency:.0f} ms | {agree} |"
        )
    return "\n".join(lines)


def _version() -> str:
    from lopa import __version__

    return __version__
