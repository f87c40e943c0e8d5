"""PNG plot for ``lopa bench``: accuracy vs TPF, one curve per decoder family, AUP in the legend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

_STYLE = {
    "threshold (τ sweep)": ("tab:gray", "o", "-"),
    "threshold (τ = 0.9)": ("tab:gray", "o", "-"),
    "d2f (τ = 0.9)": ("tab:brown", "s", "-"),
    "d2f (τ sweep)": ("tab:brown", "s", "-"),
    "lopa over threshold (k sweep)": ("tab:blue", "o", "-"),
    "lopa over d2f (k sweep)": ("tab:orange", "s", "-"),
    "lopa over threshold, shared score": ("tab:blue", "^", ":"),
    "lopa over d2f, shared score": ("tab:orange", "v", ":"),
}


def plot_bench(rows: list[Any], families: dict[str, dict], out: Path) -> None:
    """Accuracy (%) vs TPF per family (rows are lopa.tiny.bench_rows.Row), the controls as single markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {r.name: r for r in rows}
    fig, ax = plt.subplots(figsize=(10, 5.6))
    points = [(r.tpf, 100 * r.accuracy) for r in rows]
    xspan = (max(x for x, _ in points) - min(x for x, _ in points)) or 1.0
    yspan = (max(y for _, y in points) - min(y for _, y in points)) or 1.0
    placed: list[tuple[float, float]] = []

    def label(text: str, x: float, y: float, color: str) -> None:
        """Annotate unless another label is already close by (so none overlap)."""
        if any(abs(x - px) / xspan < 0.06 and abs(y - py) / yspan < 0.05 for px, py in placed):
            return
        placed.append((x, y))
        ax.annotate(text, (x, y), fontsize=7, color=color, xytext=(4, -10), textcoords="offset points")

    for family, f in families.items():
        if f["members"] == ["threshold+1"]:
            continue  # the control: drawn below as a marker of its own
        members = sorted((by_name[m] for m in f["members"]), key=lambda r: r.tpf)
        color, marker, line = _STYLE.get(family, ("black", "o", "-"))
        xs, ys = [r.tpf for r in members], [100 * r.accuracy for r in members]
        ax.plot(xs, ys, linestyle=line, marker=marker, color=color, label=f"{family}: AUP {f['aup']:.0f}")
        if "shared" in family:
            continue  # same k labels as the mean-score curve
        for r in members:
            is_base = r.name in ("threshold", "d2f") and "lopa" in family
            tag = "k=0" if is_base else f"k={r.branches}" if r.name.startswith("lopa") else f"τ={r.threshold:g}"
            label(tag, r.tpf, 100 * r.accuracy, color)
    control = families.get("threshold+1 (no search)")
    for name, marker in (("threshold+1", "X"), ("vanilla", "D")):
        if name in by_name:
            r = by_name[name]
            text = name
            if name == "threshold+1":
                text = f"{name} (no search)" + (f": AUP {control['aup']:.0f}" if control is not None else "")
            ax.scatter([r.tpf], [100 * r.accuracy], marker=marker, s=60, color="black", zorder=3, label=text)
    ax.set_xlabel("tokens per forward (TPF)")
    ax.set_ylabel("exact-answer accuracy (%)")
    ax.set_title("lopa bench: accuracy vs parallelism on the bundled model")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
