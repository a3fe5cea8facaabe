"""Laying planned rows out as a batch of int32 arrays."""

from collections.abc import Sequence

import numpy as np

from jlora.data.tokenize import Example

BATCH_KEYS = ("inputs", "targets", "loss_mask", "positions", "segment_ids")


def make_batch(examples: Sequence[Example], rows: Sequence[Sequence[int]], *, seq_len: int,
               pad_id: int = 0) -> dict[str, np.ndarray]:
    """Builds a batch of ``len(rows)`` rows from examples; every array is int32 [B, T].

    For an example with tokens ``x`` and mask ``m`` placed at columns ``c:c + n``
    (``n = len(x) - 1``): ``inputs = x[:-1]``, ``targets = x[1:]`` (logits at column t
    predict ``targets[t]``), ``loss_mask = m[1:]``, ``positions = 0..n-1`` and
    ``segment_ids = k`` for the row's k-th example (1-based). Padding has ``inputs`` and
    ``targets`` equal to ``pad_id`` and zeros elsewhere; an empty row is all padding.
    Attention should be restricted to equal, non-zero segment ids.
    """
    out = {key: np.zeros((len(rows), seq_len), np.int32) for key in BATCH_KEYS}
    out["inputs"][:] = pad_id
    out["targets"][:] = pad_id
    for r, row in enumerate(rows):
        col = 0
        for segment, i in enumerate(row, start=1):
            tokens, mask = examples[i]
            n = len(tokens) - 1
            if col + n > seq_len:
                raise ValueError(f"row {r} needs {col + n} positions; {seq_len=}")
            span = slice(col, col + n)
            out["inputs"][r, span] = tokens[:-1]
            out["targets"][r, span] = tokens[1:]
            out["loss_mask"][r, span] = mask[1:]
            out["positions"][r, span] = np.arange(n)
            out["segment_ids"][r, span] = segment
            col += n
    return out
