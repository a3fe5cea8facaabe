"""Batch layout and packing invariants, on synthetic examples of random lengths."""

import collections

import numpy as np
import pytest

from jlora.data import BATCH_KEYS, Example, make_batch, plan_rows


def _examples(n, seq_len, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(2, seq_len + 2))  # 1..seq_len positions
        tokens = rng.integers(3, 500, size=length).astype(np.int32)
        mask = rng.random(length) < 0.6
        out.append(Example(tokens, mask))
    return out


def _segments(batch, r):
    """Splits row r back into examples: {segment id: (tokens, mask[1:])}."""
    out = {}
    for s in sorted(set(batch["segment_ids"][r].tolist()) - {0}):
        cols = np.flatnonzero(batch["segment_ids"][r] == s)
        assert (np.diff(cols) == 1).all(), "a segment is contiguous"
        tokens = np.append(batch["inputs"][r, cols], batch["targets"][r, cols[-1]])
        out[s] = (tokens, batch["loss_mask"][r, cols], batch["positions"][r, cols])
    return out


@pytest.mark.parametrize("packing", [False, True])
def test_rows_rebuild_every_example_exactly_once(packing):
    seq_len = 16
    examples = _examples(101, seq_len)
    rows = plan_rows([len(e.tokens) - 1 for e in examples], seq_len=seq_len, packing=packing)
    batch = make_batch(examples, rows, seq_len=seq_len, pad_id=7)
    assert set(batch) == set(BATCH_KEYS)
    assert all(v.shape == (len(rows), seq_len) and v.dtype == np.int32 for v in batch.values())

    seen = []
    for r, row in enumerate(rows):
        segments = _segments(batch, r)
        assert sorted(segments) == list(range(1, len(row) + 1))
        if not packing:
            assert len(row) == 1
        for s, i in enumerate(row, start=1):
            tokens, loss_mask, positions = segments[s]
            np.testing.assert_array_equal(tokens, examples[i].tokens)
            np.testing.assert_array_equal(loss_mask, examples[i].mask[1:])
            np.testing.assert_array_equal(positions, np.arange(len(tokens) - 1))
        seen.extend(row)
        pad = batch["segment_ids"][r] == 0
        assert (batch["inputs"][r, pad] == 7).all() and (batch["targets"][r, pad] == 7).all()
        assert not batch["loss_mask"][r, pad].any() and not batch["positions"][r, pad].any()
        # padding only after the last segment; segment ids non-decreasing
        used = np.flatnonzero(~pad)
        assert used.size == 0 or used[-1] == used.size - 1
        assert (np.diff(batch["segment_ids"][r, ~pad]) >= 0).all()
    assert sorted(seen) == list(range(len(examples)))


def test_packing_preserves_token_multiset_and_is_greedy():
    seq_len = 32
    examples = _examples(300, seq_len, seed=1)
    lengths = [len(e.tokens) - 1 for e in examples]
    rows = plan_rows(lengths, seq_len=seq_len, packing=True)
    batch = make_batch(examples, rows, seq_len=seq_len)
    real = batch["segment_ids"] > 0
    want = collections.Counter(np.concatenate([e.tokens[:-1] for e in examples]).tolist())
    assert collections.Counter(batch["inputs"][real].tolist()) == want
    want = collections.Counter(np.concatenate([e.tokens[1:] for e in examples]).tolist())
    assert collections.Counter(batch["targets"][real].tolist()) == want
    assert [i for row in rows for i in row] == list(range(len(examples)))  # order kept
    for row, following in zip(rows, rows[1:]):
        used = sum(lengths[i] for i in row)
        assert used <= seq_len < used + lengths[following[0]]  # next example did not fit
    assert len(rows) < len(examples)


def test_positions_reset_at_each_segment():
    examples = [Example(np.arange(1, 5, dtype=np.int32), np.ones(4, bool)),
                Example(np.arange(5, 8, dtype=np.int32), np.array([0, 0, 1], bool))]
    batch = make_batch(examples, [(0, 1), ()], seq_len=8)
    np.testing.assert_array_equal(batch["inputs"], [[1, 2, 3, 5, 6, 0, 0, 0], [0] * 8])
    np.testing.assert_array_equal(batch["targets"], [[2, 3, 4, 6, 7, 0, 0, 0], [0] * 8])
    np.testing.assert_array_equal(batch["loss_mask"], [[1, 1, 1, 0, 1, 0, 0, 0], [0] * 8])
    np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 0, 1, 0, 0, 0], [0] * 8])
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 2, 2, 0, 0, 0], [0] * 8])


def test_plan_rows_rejects_untruncated_examples():
    with pytest.raises(ValueError, match="example 1 fills 9 positions"):
        plan_rows([3, 9], seq_len=8, packing=True)
