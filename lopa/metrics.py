"""AUP, Accuracy Under Parallelism (the d3LLM leaderboard's metric), as defined in docs/algorithm.md §5.

For one decoder family, its sweep points (ρᵢ = TPF, yᵢ = accuracy in %) are sorted by ρ; points with
yᵢ < y₁ − 5 (y₁ = accuracy of the lowest-TPF point) are dropped; then

    AUP = ρ₁·y₁ + ½ Σᵢ₌₂..ₘ (ρᵢ − ρᵢ₋₁)·(yᵢ·W(yᵢ) + yᵢ₋₁·W(yᵢ₋₁)),   W(y) = min(exp(−α·(1 − y / y_max)), 1)

with α = 3 and y_max the best accuracy of any decoder on the task. Higher is better: it rewards TPF gained at
little cost in accuracy. Called by ``lopa bench`` (``lopa.tiny.bench_rows``); it sits below both ``tiny/`` and
``eval/`` so either may use it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

ALPHA = 3.0
DROP_BELOW = 5.0  # accuracy points under y₁ that a point may lose and still count


@dataclass(frozen=True)
class AUP:
    """The value and the (TPF, accuracy %) points it used, sorted by TPF."""

    value: float
    points: tuple[tuple[float, float], ...]


def weight(y: float, y_max: float, alpha: float = ALPHA) -> float:
    """W(y) = min(exp(−α·(1 − y / y_max)), 1); 0 when y_max is 0."""
    if y_max <= 0:
        return 0.0
    return min(math.exp(-alpha * (1.0 - y / y_max)), 1.0)


def aup(points: Sequence[tuple[float, float]], y_max: float, alpha: float = ALPHA) -> AUP:
    """AUP of one family's sweep: ``points`` are (TPF, accuracy in %); ``y_max`` in % too."""
    if not points:
        raise ValueError("AUP needs at least one (tpf, accuracy) point")
    ordered = sorted(points)
    y1 = ordered[0][1]
    kept = [p for p in ordered if p[1] >= y1 - DROP_BELOW]
    rho1, _ = kept[0]
    value = rho1 * y1
    for (r0, a0), (r1, a1) in zip(kept, kept[1:], strict=False):
        value += 0.5 * (r1 - r0) * (a1 * weight(a1, y_max, alpha) + a0 * weight(a0, y_max, alpha))
    return AUP(value, tuple(kept))
