"""AUP (docs/algorithm.md §5) by hand: literals worked out on paper, each case chosen so that one misreading of the
definition gives another number (a weighted first term, y_max taken from the family, a drop rule measured from
anything but y₁, a strict drop boundary).

    AUP = ρ₁·y₁ + ½ Σᵢ₌₂..ₘ (ρᵢ − ρᵢ₋₁)·(yᵢ·W(yᵢ) + yᵢ₋₁·W(yᵢ₋₁)),   W(y) = min(exp(−3·(1 − y / y_max)), 1)

over the points sorted by TPF with yᵢ ≥ y₁ − 5 (y₁: the lowest-TPF point's accuracy), y_max the best accuracy of
any decoder on the task.
"""

from __future__ import annotations

import pytest

from lopa.metrics import aup
from lopa.tiny.bench_rows import Row, family_aup


def test_y1_below_y_max_and_a_point_between_the_cut_offs() -> None:
    # y_max = 90, y₁ = 80: the cut-off is y₁ − 5 = 75, so (3.0, 78.5) stays although it is more than 5 under
    # y_max (85), under the previous point (84 − 5 = 79) and under the family's best (79); (4.0, 74.0) goes.
    # W(80) = e^(−3·10/90) = e^(−1/3) = 0.716531, W(84) = e^(−0.2) = 0.818731, W(78.5) = e^(−0.383333) = 0.681586
    # AUP = 1·80 + ½·1·(84·0.818731 + 80·0.716531) + ½·1·(78.5·0.681586 + 84·0.818731)
    #     = 80 + ½·(68.77338 + 57.32250) + ½·(53.50448 + 68.77338) = 80 + 63.04794 + 61.13893 = 204.18687
    # (a weighted first term 80·W(80) would give 181.509; dropping (3.0, 78.5) 143.048)
    result = aup([(3.0, 78.5), (1.0, 80.0), (4.0, 74.0), (2.0, 84.0)], y_max=90.0)
    assert result.points == ((1.0, 80.0), (2.0, 84.0), (3.0, 78.5))
    assert result.value == pytest.approx(204.18687, abs=1e-4)


def test_a_point_exactly_five_under_y1_is_kept() -> None:
    # yᵢ ≥ y₁ − 5 keeps (2.0, 75.0) when y₁ = 80: W(75) = e^(−3·5/80) = e^(−0.1875) = 0.829029, W(80) = 1
    # AUP = 1·80 + ½·1·(75·0.829029 + 80·1) = 80 + ½·(62.17718 + 80) = 151.08859
    result = aup([(1.0, 80.0), (2.0, 75.0)], y_max=80.0)
    assert result.points == ((1.0, 80.0), (2.0, 75.0))
    assert result.value == pytest.approx(151.08859, abs=1e-4)
    # a hair under the cut-off is dropped: only ρ₁·y₁ is left
    below = aup([(1.0, 80.0), (2.0, 74.99)], y_max=80.0)
    assert below.points == ((1.0, 80.0),) and below.value == pytest.approx(80.0)


def _row(name: str, tpf: float, accuracy: float) -> Row:
    """A bench row with only what AUP reads: the decoder's name, TPF and accuracy (a fraction)."""
    return Row(
        name=name,
        settings="",
        accuracy=accuracy,
        wellformed=1.0,
        tpf=tpf,
        tpf_paper=tpf,
        forwards=1.0,
        tok_s=1.0,
        latency=1.0,
        agreement=None,
        branches=0,
        base="",
        score="",
        threshold=0.9,
    )


def test_families_share_the_best_accuracy_of_any_decoder() -> None:
    # vanilla (93.75 %) belongs to no family with two points, yet it sets y_max for both families;
    # the families' own bests differ (87.5 and 75), so a per-family y_max changes both values.
    rows = [
        _row("vanilla", 1.0, 0.9375),
        _row("threshold@0.95", 1.0, 0.875),
        _row("threshold", 2.0, 0.84375),
        _row("d2f@0.95", 1.5, 0.75),
        _row("d2f", 3.0, 0.71875),
    ]
    families = family_aup(rows)
    assert set(families) == {"threshold (τ sweep)", "d2f (τ sweep)"}
    # threshold: W(87.5) = e^(−3·(1 − 87.5/93.75)) = e^(−0.2) = 0.818731, W(84.375) = e^(−0.3) = 0.740818
    # AUP = 1·87.5 + ½·1·(84.375·0.740818 + 87.5·0.818731) = 87.5 + ½·(62.50654 + 71.63894) = 154.57274
    threshold = families["threshold (τ sweep)"]
    assert threshold["points"] == [[1.0, 87.5], [2.0, 84.38]]
    assert threshold["aup"] == pytest.approx(154.57, abs=0.006)
    # d2f: W(75) = e^(−3·0.2) = e^(−0.6) = 0.548812, W(71.875) = e^(−0.7) = 0.496585
    # AUP = 1.5·75 + ½·1.5·(71.875·0.496585 + 75·0.548812) = 112.5 + 0.75·(35.69207 + 41.16087) = 170.13971
    # (with the family's own best, 75, as y_max: 216.32)
    d2f = families["d2f (τ sweep)"]
    assert d2f["points"] == [[1.5, 75.0], [3.0, 71.88]]
    assert d2f["aup"] == pytest.approx(170.14, abs=0.006)
