"""Sweep plots (PNG, matplotlib Agg): TPF vs branches and score vs tok/s with the Pareto front marked.

Called by :mod:`lopa.eval.sweep`. The two figures follow the LoPA paper's Figure 4 (TPF grows with the number
of branches) and Figure 1 (the score / throughput trade-off) in spirit. Rows are sweep summaries: dicts with
``decoder``, ``branches``, ``threshold``, ``score``, ``tok_s`` and ``tpf`` keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lopa.errors import ConfigError


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (both maximized), in input order."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any((ox >= x and oy >= y) and (ox > x or oy > y) for j, (ox, oy) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def _pyplot():  # noqa: ANN202 - the matplotlib.pyplot module
    try:
        import matplotlib
    except ImportError as e:
        raise ConfigError("plots need matplotlib: pip install 'lopa[plot]' (or run the sweep with --no-plots)") from e
    matplotlib.use("Agg")  # files only; never opens a window
    import matplotlib.pyplot as plt

    return plt


def check_plotting() -> None:
    """Fail before a long sweep rather than after it."""
    _pyplot()


def plot_tpf_vs_branches(rows: list[dict[str, Any]], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    lopa_rows = [r for r in rows if r["decoder"] == "lopa"]
    for threshold in sorted({r["threshold"] for r in lopa_rows}):
        series = sorted((r["branches"], r["tpf"]) for r in lopa_rows if r["threshold"] == threshold)
        ax.plot([b for b, _ in series], [t for _, t in series], marker="o", label=f"lopa, tau_conf={threshold}")
    for r in rows:
        if r["decoder"] != "lopa":  # baselines: one horizontal reference line each
            ax.axhline(r["tpf"], linestyle="--", linewidth=1, alpha=0.7, label=f"{r['decoder']}, tau={r['threshold']}")
    return _save(plt, fig, ax, path, "lookahead branches k", "tokens per forward (TPF)", "TPF vs branches")


def plot_score_vs_throughput(rows: list[dict[str, Any]], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    points = [(r["tok_s"], r["score"]) for r in rows]
    front = set(pareto_front(points))
    for decoder in sorted({r["decoder"] for r in rows}):
        idx = [i for i, r in enumerate(rows) if r["decoder"] == decoder]
        ax.scatter([points[i][0] for i in idx], [points[i][1] for i in idx], label=decoder, alpha=0.8)
    for i, r in enumerate(rows):
        ax.annotate(r["name"], points[i], fontsize=6, xytext=(3, 3), textcoords="offset points")
    line = sorted(points[i] for i in front)
    ax.plot([x for x, _ in line], [y for _, y in line], color="black", linewidth=1, label="Pareto front")
    ax.scatter([x for x, _ in line], [y for _, y in line], facecolors="none", edgecolors="black", s=90)
    return _save(plt, fig, ax, path, "tokens per second (aggregate)", "score", "score vs throughput")


def _save(plt: Any, fig: Any, ax: Any, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Label, grid and legend the axes, then write the PNG and free the figure."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
