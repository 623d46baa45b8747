"""lr_at: warmup, cosine to a floor, WSD, constant; worked values in comments."""

import math

import pytest

from train.schedule import lr_at


def test_warmup_is_linear_and_never_zero():
    # peak 1.0, warmup 4: steps 0..3 -> 0.25, 0.5, 0.75, 1.0
    assert [lr_at(s, 1.0, 0.1, 4, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_cosine_midpoint_and_floor():
    # warmup 0, total 10: step 5 is half way: floor + 0.5 * (peak - floor) = 0.55
    assert lr_at(5, 1.0, 0.1, 0, 10) == pytest.approx(0.55)
    assert lr_at(0, 1.0, 0.1, 0, 10) == pytest.approx(1.0)
    assert lr_at(10, 1.0, 0.1, 0, 10) == pytest.approx(0.1)
    assert lr_at(50, 1.0, 0.1, 0, 10) == pytest.approx(0.1)  # held at the floor after total


def test_cosine_is_monotone_after_warmup():
    lrs = [lr_at(s, 3e-4, 3e-5, 10, 100) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert math.isclose(lrs[0], 3e-4)


def test_wsd_stable_then_linear_decay():
    # total 10, decay_fraction 0.2 -> decay over steps 8..10; warmup 2
    lrs = [lr_at(s, 1.0, 0.0, 2, 10, "wsd", 0.2) for s in range(11)]
    assert lrs[:2] == [0.5, 1.0]
    assert lrs[2:9] == [1.0] * 7
    assert lrs[9] == pytest.approx(0.5) and lrs[10] == pytest.approx(0.0)


def test_constant_and_unknown():
    assert lr_at(99, 2.0, 0.0, 0, 10, "constant") == 2.0
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at(0, 1.0, 0.0, 0, 10, "linear")
