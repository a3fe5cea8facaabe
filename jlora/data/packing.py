"""Which examples share a row: one per row, or greedy packing."""

from collections.abc import Sequence


def plan_rows(lengths: Sequence[int], *, seq_len: int, packing: bool) -> list[tuple[int, ...]]:
    """Groups example indices into rows of at most ``seq_len`` positions.

    ``lengths[i]`` is the number of positions example ``i`` fills: its token count minus
    one. Without packing each example gets its own row. With packing, examples are laid
    end to end in order, and a new row starts whenever the next example would not fit,
    so an example never crosses rows.
    """
    for i, n in enumerate(lengths):
        if not 1 <= n <= seq_len:
            raise ValueError(f"example {i} fills {n} positions; expected 1..{seq_len=} "
                             "(truncate to seq_len + 1 tokens first)")
    if not packing:
        return [(i,) for i in range(len(lengths))]
    rows, row, used = [], [], 0
    for i, n in enumerate(lengths):
        if used + n > seq_len:
            rows.append(tuple(row))
            row, used = [], 0
        row.append(i)
        used += n
    if row:
        rows.append(tuple(row))
    return rows
