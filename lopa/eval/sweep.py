"""``lopa sweep``: run one task over a grid of decoder x branches x thresholds; write a table and plots.

Registered in :mod:`lopa.cli`. The model and documents are loaded once; each grid point is one
:func:`lopa.eval.runner.evaluate` run writing its own ``runs/<name>/`` files. Then ``sweep.csv``,
``sweep.md`` and ``sweep.json`` (one row per point, with a ``pareto`` flag for score vs tok/s) and the two
PNG plots of :mod:`lopa.eval.plots`. Branch counts apply to the lopa decoder only; other decoders run once
per threshold (vanilla, which has no threshold, once).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

from lopa.cli import add_decode_arguments
from lopa.config import DECODERS, DecodeConfig
from lopa.errors import ConfigError
from lopa.eval import plots
from lopa.eval.cli import (
    add_task_arguments,
    check_out_dir,
    evaluate_with_args,
    load_docs,
    load_llm,
    make_sandbox,
    task_config,
)
from lopa.eval.tasks import get_task

COLUMNS = (
    "name",
    "decoder",
    "base",
    "branches",
    "threshold",
    "score",
    "tok_s",
    "tpf",
    "tpf_paper",
    "latency",
    "pareto",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_task_arguments(p)
    p.add_argument("--decoders", default="threshold,lopa", help="comma-separated decoders to sweep")
    p.add_argument("--branch-grid", default="1,2,4,8", help="comma-separated lopa branch counts")
    p.add_argument("--thresholds", default="0.9", help="comma-separated tau_conf values")
    p.add_argument("--out", default=None, help="output directory (default: sweep-out/<task>-<model>)")
    p.add_argument("--no-plots", action="store_true", help="write the table only")
    add_decode_arguments(p)


def grid(base: DecodeConfig, decoders: list[str], branches: list[int], thresholds: list[float]) -> list[DecodeConfig]:
    """Every configuration of the sweep, validated, in a stable order."""
    configs = []
    for decoder in decoders:
        if decoder not in DECODERS:
            raise ConfigError(f"--decoders: unknown decoder {decoder!r}; choose from {list(DECODERS)}")
        for t in thresholds if decoder != "vanilla" else [base.threshold]:
            for k in branches if decoder == "lopa" else [0]:
                configs.append(base.replace(decoder=decoder, threshold=t, branches=k if decoder == "lopa" else 0))
    return [c.validate() for c in configs]


def run_name(c: DecodeConfig) -> str:
    if c.decoder == "lopa":
        return f"lopa-{c.base}-k{c.branches}-t{c.threshold:g}"
    return c.decoder if c.decoder == "vanilla" else f"{c.decoder}-t{c.threshold:g}"


def _parse_list(text: str, kind: type, flag: str) -> list[Any]:
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise ConfigError(f"{flag}: expected a comma-separated list of {kind.__name__}, got {text!r}") from e
    if not values:
        raise ConfigError(f"{flag} is empty")
    return values


def row_of(name: str, c: DecodeConfig, summary: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "decoder": c.decoder,
        "base": c.base if c.decoder == "lopa" else "",
        "branches": c.num_branches,
        "threshold": c.threshold,
        "score": summary["score"],
        "tok_s": summary["tok_s"],
        "tpf": summary["tpf_mean"],
        "tpf_paper": summary["tpf_paper_mean"],
        "latency": summary["latency_mean"],
    }


def write_table(rows: list[dict[str, Any]], out: Path) -> None:
    front = set(plots.pareto_front([(r["tok_s"], r["score"]) for r in rows]))
    for i, r in enumerate(rows):
        r["pareto"] = i in front
    with open(out / "sweep.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [f"{r[c]:.4g}" if isinstance(r[c], float) else ("*" if r[c] is True else str(r[c])) for c in COLUMNS]
        lines.append("| " + " | ".join("" if x == "False" else x for x in cells) + " |")
    (out / "sweep.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


def run(args: argparse.Namespace) -> int:
    decoders = _parse_list(args.decoders, str, "--decoders")
    branch_grid = _parse_list(args.branch_grid, int, "--branch-grid")
    thresholds = _parse_list(args.thresholds, float, "--thresholds")
    if not args.no_plots:
        plots.check_plotting()
    task = get_task(args.task)
    docs = load_docs(task, args)
    sandbox = make_sandbox(task, args)
    llm = load_llm(args)
    configs = grid(task_config(task, llm, args), decoders, branch_grid, thresholds)
    out = check_out_dir(
        Path(args.out) if args.out else Path("sweep-out") / f"{task.name}-{llm.model_name.replace('/', '--')}"
    )
    rows = []
    for i, c in enumerate(configs):
        name = run_name(c)
        print(f"[{i + 1}/{len(configs)}] {name}", flush=True)
        result = evaluate_with_args(llm, task, docs, c, sandbox, args, out / "runs" / name)
        rows.append(row_of(name, c, result.summary))
    write_table(rows, out)
    print((out / "sweep.md").read_text(encoding="utf-8"), end="")
    if not args.no_plots:
        plots.plot_tpf_vs_branches(rows, out / "tpf_vs_branches.png")
        plots.plot_score_vs_throughput(rows, out / "score_vs_tok_s.png")
    print(f"wrote {out}/sweep.csv, sweep.md, sweep.json" + ("" if args.no_plots else " and two PNG plots"))
    return 0
