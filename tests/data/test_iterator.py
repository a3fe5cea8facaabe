"""Order, epochs, resume and per-host slices of BatchIterator."""

import json

import numpy as np
import pytest

from jlora.data import BatchIterator, DataError, Example, steps_per_epoch


def _examples(n, seq_len=16, seed=0):
    """Random examples; example i starts with token 1000 + i, so rows are identifiable."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(2, seq_len + 2))
        tokens = rng.integers(3, 500, size=length).astype(np.int32)
        tokens[0] = 1000 + i
        out.append(Example(tokens, np.ones(length, bool)))
    return out


def _take(it, k):
    return [next(it) for _ in range(k)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def _row_ids(batch):
    """The example index starting each row (unpacked rows hold one example each)."""
    return [int(row[0]) - 1000 for row in batch["inputs"] if row[0] >= 1000]


KW = dict(seq_len=16, batch_size=4)


@pytest.mark.parametrize("packing", [False, True])
def test_same_seed_same_batches_other_seed_other_order(packing):
    examples = _examples(50)
    a = _take(BatchIterator(examples, packing=packing, seed=3, **KW), 30)
    _assert_same(a, _take(BatchIterator(examples, packing=packing, seed=3, **KW), 30))
    b = _take(BatchIterator(examples, packing=packing, seed=4, **KW), 30)
    assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, b))


def test_each_epoch_visits_every_row_once_in_its_own_order():
    examples = _examples(40)  # 10 full batches of 4 rows
    it = BatchIterator(examples, seed=0, epochs=3, **KW)
    assert it.steps_per_epoch == 10
    epochs = [_take(it, 10) for _ in range(3)]
    with pytest.raises(StopIteration):
        next(it)
    orders = []
    for batches in epochs:
        rows = [r for b in batches for r in _row_ids(b)]
        assert sorted(rows) == list(range(40))
        orders.append(rows)
    assert orders[0] != orders[1] != orders[2]
    # the order is numpy's permutation seeded by (seed, epoch)
    perm = np.random.default_rng([0, 1]).permutation(40)
    assert orders[1] == perm.tolist()


def test_no_shuffle_keeps_file_order():
    examples = _examples(10)
    it = BatchIterator(examples, shuffle=False, epochs=1, **KW)
    assert [r for b in it for r in _row_ids(b)] == list(range(10))


def test_last_partial_batch_is_padded_or_dropped():
    examples = _examples(10)
    kept = list(BatchIterator(examples, epochs=1, **KW))
    assert len(kept) == 3 == steps_per_epoch(examples, **KW)
    assert (kept[-1]["segment_ids"][2:] == 0).all() and kept[-1]["segment_ids"][:2].any()
    dropped = list(BatchIterator(examples, epochs=1, drop_last=True, **KW))
    assert len(dropped) == 2 == steps_per_epoch(examples, drop_last=True, **KW)
    with pytest.raises(DataError, match="no full batch"):
        BatchIterator(examples[:3], drop_last=True, **KW)


@pytest.mark.parametrize("packing", [False, True])
def test_steps_per_epoch_matches_iteration(packing):
    examples = _examples(77)
    it = BatchIterator(examples, packing=packing, epochs=1, **KW)
    assert len(list(it)) == it.steps_per_epoch == steps_per_epoch(examples, packing=packing, **KW)


@pytest.mark.parametrize("k", [0, 1, 7, 13, 25])
@pytest.mark.parametrize("packing", [False, True])
def test_resume_yields_the_remaining_batches(k, packing):
    examples = _examples(45)
    kw = dict(packing=packing, seed=11, epochs=3, **KW)
    reference = list(BatchIterator(examples, **kw))
    it = BatchIterator(examples, **kw)
    _assert_same(_take(it, k), reference[:k])
    saved = json.loads(json.dumps(it.state()))
    resumed = BatchIterator(examples, **kw)
    resumed.restore(saved)
    _assert_same(list(resumed), reference[k:])


def test_state_counts_epoch_and_index():
    it = BatchIterator(_examples(12), **KW)  # 3 steps per epoch
    assert it.state() == {"epoch": 0, "index": 0}
    _take(it, 4)
    assert it.state() == {"epoch": 1, "index": 1}


@pytest.mark.parametrize("bad", [{}, {"epoch": 0}, {"epoch": -1, "index": 0},
                                 {"epoch": 0, "index": 3}, {"epoch": "0", "index": 0}])
def test_restore_rejects_bad_state(bad):
    it = BatchIterator(_examples(12), **KW)
    with pytest.raises(ValueError, match="cannot restore"):
        it.restore(bad)


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("count", [2, 4])
def test_host_slices_concatenate_to_the_global_batch(packing, count):
    examples = _examples(37)
    kw = dict(packing=packing, seed=5, epochs=2, **KW)
    global_batches = list(BatchIterator(examples, **kw))
    hosts = [list(BatchIterator(examples, process_index=h, process_count=count, **kw))
             for h in range(count)]
    for step, batch in enumerate(global_batches):
        parts = [hosts[h][step] for h in range(count)]
        assert all(p["inputs"].shape == (4 // count, 16) for p in parts)
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), batch[key])


def test_argument_errors():
    examples = _examples(8)
    with pytest.raises(ValueError, match="batch_size=6 must be a positive multiple of process_"):
        BatchIterator(examples, seq_len=16, batch_size=6, process_count=4)
    with pytest.raises(ValueError, match="process_index=2"):
        BatchIterator(examples, seq_len=16, batch_size=4, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="epochs=0"):
        BatchIterator(examples, epochs=0, **KW)
    with pytest.raises(DataError, match="no examples"):
        BatchIterator([], **KW)
