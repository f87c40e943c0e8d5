"""A sweep: one task over a grid of decoder x branches x thresholds, written as a table (``lopa sweep``).

The command (``commands/sweep.py``) loads the model and documents are loaded once; each grid point is one
:func:`lopa.eval.runner.evaluate` run writing its own ``runs/<name>/`` files. Then ``sweep.csv``,
``sweep.md`` and ``sweep.json`` (one row per point, with a ``pareto`` flag for score vs tok/s) and the two
PNG plots of :mod:`lopa.eval.plots`. Branch counts apply to the lopa decoder only; other decoders run once
per threshold (vanilla, which has no threshold, once).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from lopa.config import DECODERS, DecodeConfig
from lopa.errors import ConfigError
from lopa.eval import plots

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
