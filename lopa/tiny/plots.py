"""PNG plot for ``lopa bench``: accuracy vs TPF, one curve per decoder family, AUP in the legend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

_STYLE = {
    "threshold (τ sweep)": ("tab:gray", "o", "-"),
    "d2f (τ sweep)": ("tab:brown", "s", "-"),
    "lopa over threshold (k sweep)": ("tab:blue", "o", "-"),
    "lopa over d2f (k sweep)": ("tab:orange", "s", "-"),
    "lopa over threshold, shared score": ("tab:blue", "^", ":"),
    "lopa over d2f, shared score": ("tab:orange", "v", ":"),
}


def plot_bench(rows: list[Any], families: dict[str, dict], out: Path) -> None:
    """Accuracy (%) vs TPF per family (rows are lopa.tiny.bench.Row), the controls as single markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {r.name: r for r in rows}
    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    for family, f in families.items():
        members = [by_name[m] for m in f["members"]]
        members.sort(key=lambda r: r.tpf)
        color, marker, line = _STYLE.get(family, ("black", "o", "-"))
        xs, ys = [r.tpf for r in members], [100 * r.accuracy for r in members]
        ax.plot(xs, ys, linestyle=line, marker=marker, color=color, label=f"{family}: AUP {f['aup']:.0f}")
        if "shared" in family:
            continue  # same k labels as the mean-score curve; labelling both would overlap
        for r in members:
            tag = f"k={r.branches}" if r.name.startswith("lopa") else f"τ={r.threshold:g}"
            if r.name in ("threshold", "d2f") and "lopa" in family:
                tag = "k=0"
            ax.annotate(
                tag, (r.tpf, 100 * r.accuracy), fontsize=7, color=color, xytext=(4, -10), textcoords="offset points"
            )
    for name, marker in (("threshold+1", "X"), ("vanilla", "D")):
        if name in by_name:
            r = by_name[name]
            ax.scatter(
                [r.tpf],
                [100 * r.accuracy],
                marker=marker,
                s=60,
                color="black",
                zorder=3,
                label=f"{name} (no search)" if name == "threshold+1" else name,
            )
    ax.set_xlabel("tokens per forward (TPF)")
    ax.set_ylabel("exact-answer accuracy (%)")
    ax.set_title("lopa bench: accuracy vs parallelism on the bundled model")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
