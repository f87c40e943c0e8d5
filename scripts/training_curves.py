"""Validation curves of ``lopa train`` runs: a markdown table and, with ``--plot``, a PNG.

Reads each run's ``train_log.jsonl`` (the records with a ``validation`` entry) and prints one row per run:
accuracy / well-formed in % at every validated step. ``--plot`` draws accuracy (solid) and well-formedness
(dashed) against the step, one colour per run. Also prints, per run, the largest drop of accuracy between
consecutive validations in the last third of training.

    python scripts/training_curves.py runs/tiny-v3-s0 runs/tiny-v3-s1 --plot docs/tiny-training.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def validations(run: Path) -> list[tuple[int, float, float]]:
    """(step, accuracy %, well-formed %) of every validation in the run's log, in step order (last one wins)."""
    seen: dict[int, tuple[float, float]] = {}
    for line in (run / "train_log.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if "validation" in record:
            v = record["validation"]
            seen[record["step"]] = (100 * v["accuracy"], 100 * v["wellformed"])
    return [(s, a, w) for s, (a, w) in sorted(seen.items())]


def largest_late_drop(points: list[tuple[int, float, float]]) -> float:
    """The largest fall of accuracy between consecutive validations in the last third of the steps (0 if none)."""
    last = points[-1][0]
    late = [p for p in points if p[0] >= last - last / 3]
    return max([0.0] + [a[1] - b[1] for a, b in zip(late, late[1:], strict=False)])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="lopa train --out directories")
    p.add_argument("--plot", type=Path, default=None, help="write the curves to this PNG")
    args = p.parse_args()
    curves = {run.name: validations(run) for run in args.runs}
    steps = sorted({s for points in curves.values() for s, _, _ in points})
    print("| run | " + " | ".join(f"{s:,}" for s in steps) + " |")
    print("|---|" + "---|" * len(steps))
    for name, points in curves.items():
        at = {s: f"{a:.1f}/{w:.1f}" for s, a, w in points}
        print(f"| {name} | " + " | ".join(at.get(s, "") for s in steps) + " |")
    for name, points in curves.items():
        print(
            f"{name}: largest accuracy drop between consecutive validations in the last third: "
            f"{largest_late_drop(points):.1f} points"
        )
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for i, (name, points) in enumerate(curves.items()):
            x, colour = [s for s, _, _ in points], f"C{i}"
            ax.plot(x, [a for _, a, _ in points], "-o", ms=3, color=colour, label=f"{name} accuracy")
            ax.plot(x, [w for _, _, w in points], "--", color=colour, label=f"{name} well-formed")
        ax.set_xlabel("step")
        ax.set_ylabel("validation, % of 200 problems")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
