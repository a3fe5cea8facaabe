"""The deterministic held-out split."""

import pytest

from jlora.data import split_holdout


def test_split_is_deterministic_disjoint_and_ordered():
    items = list(range(1000))
    train, held = split_holdout(items, fraction=0.05, seed=1)
    assert (train, held) == split_holdout(items, fraction=0.05, seed=1)
    assert len(held) == 50 and sorted(train + held) == items
    assert train == sorted(train) and held == sorted(held)
    assert held != split_holdout(items, fraction=0.05, seed=2)[1]
    assert held != items[-50:]  # not simply the tail


@pytest.mark.parametrize("n, fraction, held", [(2, 0.01, 1), (2, 0.99, 1), (10, 0.26, 3)])
def test_split_keeps_both_sides_non_empty(n, fraction, held):
    train, out = split_holdout(list(range(n)), fraction=fraction)
    assert len(out) == held and len(train) == n - held


def test_split_errors():
    with pytest.raises(ValueError, match="fraction=1.0"):
        split_holdout([1, 2, 3], fraction=1.0)
    with pytest.raises(ValueError, match="at least 2"):
        split_holdout([1], fraction=0.5)
