"""PNG plots for ``lopa bench``: TPF vs branches (one line per base and score) and accuracy vs TPF."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_bench(rows: list[Any], out: Path) -> None:
    """Two panels side by side; rows are lopa.tiny.bench.Row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for base in ("threshold", "d2f"):
        for score, style in (("mean", "-o"), ("shared", "--s")):
            base_row = next((r for r in rows if r.name == base), None)
            pts = sorted((r.branches, r.tpf) for r in rows if r.base == base and r.score == score)
            if base_row is not None:
                pts = [(0, base_row.tpf)] + pts
            if len(pts) > 1:
                left.plot(*zip(*pts, strict=True), style, label=f"lopa over {base} ({score} score)")
    left.set_xlabel("lookahead branches k (0 = base decoder)")
    left.set_ylabel("tokens per forward (TPF)")
    left.set_title("TPF vs branches")
    left.legend(fontsize=8)
    for r in rows:
        marker = "o" if r.name.startswith("lopa") else "D"
        right.scatter(r.tpf, 100 * r.accuracy, marker=marker)
        right.annotate(r.name, (r.tpf, 100 * r.accuracy), fontsize=6, xytext=(3, 3), textcoords="offset points")
    right.set_xlabel("tokens per forward (TPF)")
    right.set_ylabel("exact-answer accuracy (%)")
    right.set_title("accuracy vs TPF")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
