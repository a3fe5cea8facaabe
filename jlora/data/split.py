"""A deterministic held-out split, for runs given no eval file."""

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def split_holdout(items: Sequence[T], *, fraction: float, seed: int = 0
                  ) -> tuple[list[T], list[T]]:
    """Splits ``items`` into ``(train, held_out)``; both keep the original order.

    ``round(fraction * len(items))`` items, at least 1 and at most ``len(items) - 1``, are
    chosen with ``np.random.default_rng(seed)``. Split records (before tokenizing) so
    each side gets its own DataStats.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"{fraction=} must lie strictly between 0 and 1")
    n = len(items)
    if n < 2:
        raise ValueError(f"cannot hold out a fraction of {n} example(s); need at least 2")
    n_held = min(max(1, round(fraction * n)), n - 1)
    held = np.zeros(n, bool)
    held[np.random.default_rng(seed).permutation(n)[:n_held]] = True
    return ([x for x, h in zip(items, held) if not h], [x for x, h in zip(items, held) if h])
