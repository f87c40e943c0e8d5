"""``lopa sweep``: run one task over a grid of decoder x branches x thresholds; write a table and plots.

The grid, the table and the plots are :mod:`lopa.eval.sweep` and :mod:`lopa.eval.plots`; the task flags and
the evaluation helpers are ``lopa eval``'s (``commands/eval.py``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lopa.commands.eval import (
    add_task_arguments,
    check_out_dir,
    evaluate_with_args,
    load_docs,
    make_sandbox,
    task_config,
)
from lopa.commands.flags import add_decode_arguments, load_llm
from lopa.errors import ConfigError
from lopa.eval import plots
from lopa.eval.sweep import grid, row_of, run_name, write_table
from lopa.eval.tasks import get_task


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_task_arguments(p)
    p.add_argument("--decoders", default="threshold,lopa", help="comma-separated decoders to sweep")
    p.add_argument("--branch-grid", default="1,2,4,8", help="comma-separated lopa branch counts")
    p.add_argument("--thresholds", default="0.9", help="comma-separated tau_conf values")
    p.add_argument("--out", default=None, help="output directory (default: sweep-out/<task>-<model>)")
    p.add_argument("--no-plots", action="store_true", help="write the table only")
    add_decode_arguments(p)


def _parse_list(text: str, kind: type, flag: str) -> list[Any]:
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise ConfigError(f"{flag}: expected a comma-separated list of {kind.__name__}, got {text!r}") from e
    if not values:
        raise ConfigError(f"{flag} is empty")
    return values


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
