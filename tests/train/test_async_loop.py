"""The overlapped training loop (batches prefetched onto the devices, each step's metrics read one step late)
changes no number: its metrics.jsonl equals the synchronous loop's bit for bit, and a non-finite update it
reads late is still never saved."""
import json
import math
import re

import numpy as np
import pytest

from jlora.data import BatchIterator
from jlora.data.iterator import Prefetch
from jlora.train.config import TrainConfig
from jlora.train.guard import NonFiniteLoss
from jlora.train.trainer import Trainer

# eval at 3 and 6, checkpoints at 4 and the end: boundaries the loop must read at once, and lagged steps between
SETTINGS = dict(steps=7, batch_size=4, grad_accum=2, seq_len=48, lora_dropout=0.1, eval_every=3, save_every=4,
                log_every=1, progress=False, dtype="float32")


def _records(out):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_sec"} for line in lines]  # a timing


@pytest.fixture
def small_data(tmp_path):
    """80 training and 8 eval records of the bundled data (tokenizing all 2,000 would take most of the test)."""
    from jlora.default import dataset_paths
    paths = []
    for path, n in zip(dataset_paths(), (80, 8)):
        paths.append(tmp_path / path.name)
        paths[-1].write_text("".join(path.read_text().splitlines(keepends=True)[:n]))
    return paths


@pytest.fixture
def compile_once(tmp_path):
    """A persistent compilation cache for this test: the second run of the same step loads the first one's
    executable (the same program, so the same numbers) instead of compiling it again."""
    import jax
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    before = {n: getattr(jax.config, n) for n in names}
    for n, v in zip(names, (str(tmp_path / "xla-cache"), 0.0, 0)):
        jax.config.update(n, v)
    yield
    for n, v in before.items():
        jax.config.update(n, v)


def test_async_metrics_equal_the_synchronous_loop(tmp_path, default_base, small_data, compile_once):
    runs = {}
    for mode, sync in (("sync", True), ("async", False)):
        out = tmp_path / mode
        config = TrainConfig(out=str(out), model=str(default_base), data=str(small_data[0]),
                             eval=str(small_data[1]), **SETTINGS)
        result = Trainer(config, log=lambda *a: None, sync_loop=sync).run()
        runs[mode] = (_records(out), result["losses"], (out / "adapter" / "adapter_model.safetensors").read_bytes())
    (sync_records, sync_losses, sync_adapter), (records, losses, adapter) = runs["sync"], runs["async"]
    assert [r["step"] for r in records] == list(range(1, 8))
    assert sum("eval_loss" in r for r in records) == 3  # steps 3, 6 and the last
    assert records == sync_records  # float fields compared exactly (json round-trips a float's bits)
    assert losses == sync_losses and adapter == sync_adapter


@pytest.mark.slow  # ~10 s of CPU (its own compile); the synchronous case is test_train_errors'
def test_non_finite_update_read_late_is_never_saved(tmp_path, default_base, small_data):
    # Warmup from lr 0: step 1 changes nothing, step 2's update (lr 2e29) explodes the adapters. With
    # checkpoints every 2 steps, step 2 ends at a boundary: it is checked before checkpoint 2 would be written.
    out = tmp_path / "r"
    config = TrainConfig(out=str(out), model=str(default_base), data=str(small_data[0]), steps=8, save_every=2, lr=1e30, warmup_steps=5, max_grad_norm=0,
                         eval_every=0, batch_size=4, seq_len=48, progress=False, dtype="float32")
    with pytest.raises(NonFiniteLoss) as e:
        Trainer(config, log=lambda *a: None).run()
    message = str(e.value)
    saved = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    losses = {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    match = re.search(r"last good checkpoint \(its next step's loss was finite\) is step (\d+)", message)
    if match:
        good = int(match.group(1))
        assert saved[-1] == good and math.isfinite(losses[good + 1]), (message, saved, losses)
    else:
        assert "no good checkpoint was saved" in message and saved == [], (message, saved)


def _examples(n=23):
    from jlora.data.tokenize import Example
    rng = np.random.RandomState(0)
    lengths = rng.randint(5, 30, n)
    return [Example(rng.randint(3, 90, m).astype(np.int32), rng.rand(m) > 0.3) for m in lengths]


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetch_yields_the_iterator_batches_with_the_state_after_each(depth):
    def iterator():
        return BatchIterator(_examples(), seq_len=32, batch_size=4, packing=True, seed=1, epochs=2)

    plain = iterator()
    want = [(b, plain.state()) for b in plain]
    batches = Prefetch(iterator(), lambda b: {k: v + 0 for k, v in b.items()}, depth=depth)
    got = list(batches)
    batches.close()
    assert len(got) == len(want) == 2 * iterator().steps_per_epoch
    for (b, state), (wb, wstate) in zip(got, want):
        assert state == wstate and all(np.array_equal(b[k], wb[k]) for k in wb)
    with pytest.raises(StopIteration):
        next(batches)


def test_prefetch_hands_an_error_to_the_caller_and_stops_early():
    def prepare(b):
        raise RuntimeError("cannot place this batch")

    batches = Prefetch(BatchIterator(_examples(), seq_len=32, batch_size=4, seed=1), prepare, depth=2)
    with pytest.raises(RuntimeError, match="cannot place this batch"):
        next(batches)
    batches.close()
    forever = Prefetch(BatchIterator(_examples(), seq_len=32, batch_size=4, seed=1), lambda b: b, depth=2)
    next(forever)
    forever.close()  # an endless iterator's thread stops
    assert forever._thread is None
