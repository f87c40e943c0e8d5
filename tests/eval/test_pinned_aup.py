"""AUP pinned by hand (docs/algorithm.md §5): every expected value below is worked out in the comments."""

import math

import pytest

from lopa.metrics import ALPHA, AUP, aup, weight


def test_weight_by_hand() -> None:
    assert ALPHA == 3.0
    assert weight(80.0, 90.0) == pytest.approx(math.exp(-1 / 3))  # exp(-3 * (1 - 80/90)) = exp(-1/3)
    assert weight(45.0, 90.0) == pytest.approx(math.exp(-1.5))  # exp(-3 * 0.5)
    assert weight(45.0, 90.0, alpha=2.0) == pytest.approx(math.exp(-1.0))  # alpha is used, not the default
    assert weight(90.0, 90.0) == 1.0  # exp(0)
    assert weight(95.0, 90.0) == 1.0  # exp(+1/6) capped at 1
    assert weight(0.0, 90.0) == pytest.approx(math.exp(-3.0))


def test_weight_without_any_accuracy_is_zero() -> None:
    assert weight(50.0, 0.0) == 0.0  # y_max = 0: no division, weight 0
    assert weight(0.0, 0.0) == 0.0
    assert weight(1.0, 1.0) == 1.0  # a small positive y_max is a real one
    assert weight(0.5, 1.0) == pytest.approx(math.exp(-1.5))


def test_one_point_is_rho_times_y_unweighted() -> None:
    # AUP = rho1 * y1: the first term carries no W, even when y1 < y_max (W(60) = exp(-1) here)
    assert aup([(2.0, 60.0)], y_max=90.0).value == pytest.approx(120.0)
    assert aup([(2.0, 60.0)], y_max=90.0).points == ((2.0, 60.0),)


def test_two_points_by_hand() -> None:
    # 1*80 + 1/2 * (2 - 1) * (78 * W(78) + 80 * W(80)), W(78) = exp(-3 * 12/90) = exp(-0.4), W(80) = exp(-1/3)
    expected = 80.0 + 0.5 * 1.0 * (78.0 * math.exp(-0.4) + 80.0 * math.exp(-1 / 3))
    assert expected == pytest.approx(134.8037, abs=1e-4)
    assert aup([(1.0, 80.0), (2.0, 78.0)], y_max=90.0).value == pytest.approx(expected)


def test_three_points_unsorted_and_a_custom_alpha() -> None:
    # sorted by TPF: (1, 90), (3, 88), (4, 86); y_max = 90, alpha = 1:
    # W(90) = 1, W(88) = exp(-2/90), W(86) = exp(-4/90)
    w88, w86 = math.exp(-2 / 90), math.exp(-4 / 90)
    expected = 1 * 90 + 0.5 * 2 * (88 * w88 + 90) + 0.5 * 1 * (86 * w86 + 88 * w88)
    got = aup([(4.0, 86.0), (1.0, 90.0), (3.0, 88.0)], y_max=90.0, alpha=1.0)
    assert got.value == pytest.approx(expected)
    assert got.points == ((1.0, 90.0), (3.0, 88.0), (4.0, 86.0))
    assert got.value != pytest.approx(aup([(4.0, 86.0), (1.0, 90.0), (3.0, 88.0)], y_max=90.0).value)


def test_points_more_than_five_under_y1_are_dropped() -> None:
    # y1 = 80 (the lowest TPF): 75 is kept (75 >= 80 - 5), 74.9 is dropped; the rule is relative to y1, not y_max
    pts = [(1.0, 80.0), (2.0, 75.0), (3.0, 74.9), (4.0, 85.0)]
    got = aup(pts, y_max=100.0)
    assert got.points == ((1.0, 80.0), (2.0, 75.0), (4.0, 85.0))
    w = [math.exp(-3 * (1 - y / 100)) for y in (80.0, 75.0, 85.0)]
    expected = 80.0 + 0.5 * 1 * (75 * w[1] + 80 * w[0]) + 0.5 * 2 * (85 * w[2] + 75 * w[1])
    assert got.value == pytest.approx(expected)


def test_a_later_point_above_y1_stays_and_the_drop_is_not_from_the_best() -> None:
    # y1 = 60, best 90: a point at 58 is kept (58 >= 55) although it is 32 under the best
    got = aup([(1.0, 60.0), (2.0, 90.0), (3.0, 58.0)], y_max=90.0)
    assert got.points == ((1.0, 60.0), (2.0, 90.0), (3.0, 58.0))


def test_no_points_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"^AUP needs at least one \(tpf, accuracy\) point$"):
        aup([], y_max=50.0)


def test_result_type() -> None:
    got = aup([(1.0, 50.0)], 50.0)
    assert isinstance(got, AUP) and got == AUP(50.0, ((1.0, 50.0),))
