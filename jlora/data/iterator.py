"""Deterministic, resumable, per-host batches over tokenized examples."""

from collections.abc import Sequence
from typing import Any

import numpy as np

from jlora.data.batch import make_batch
from jlora.data.errors import DataError
from jlora.data.packing import plan_rows
from jlora.data.tokenize import Example


def steps_per_epoch(examples: Sequence[Example], *, seq_len: int, batch_size: int,
                    packing: bool = False, drop_last: bool = False) -> int:
    """Global batches in one epoch: ``ceil(rows / batch_size)``, or ``floor`` with drop_last."""
    rows = len(plan_rows([len(e.tokens) - 1 for e in examples], seq_len=seq_len, packing=packing))
    return rows // batch_size if drop_last else -(-rows // batch_size)


class BatchIterator:
    """Yields batches (see ``make_batch``) of this host's ``batch_size // process_count`` rows.

    Rows are planned once (``plan_rows``). Epoch ``e`` visits them in the order
    ``np.random.default_rng([seed, e]).permutation(num_rows)`` (file order when
    ``shuffle=False``), ``batch_size`` rows per global batch, and host ``h`` of ``n``
    yields rows ``h * b : (h + 1) * b`` of each global batch, ``b = batch_size // n``.
    A short last batch is filled with empty rows (all padding, zero loss_mask) unless
    ``drop_last``. Iteration ends after ``epochs`` epochs (never when None).

    ``state()`` is a JSON-able ``{"epoch", "index"}`` (``index``: the next batch in the
    epoch); an iterator built with the same arguments and ``restore(state)`` yields
    exactly the batches the original would have yielded next.

    Example:
      >>> it = BatchIterator(examples, seq_len=128, batch_size=8, packing=True, seed=0)
      >>> batch = next(it); saved = it.state()    # {"epoch": 0, "index": 1}
      >>> it2 = BatchIterator(examples, seq_len=128, batch_size=8, packing=True, seed=0)
      >>> it2.restore(saved)                       # next(it2) == next(it)
    """

    def __init__(self, examples: Sequence[Example], *, seq_len: int, batch_size: int,
                 packing: bool = False, seed: int = 0, shuffle: bool = True,
                 epochs: int | None = None, drop_last: bool = False, pad_id: int = 0,
                 process_index: int = 0, process_count: int = 1):
        if batch_size < 1 or process_count < 1 or batch_size % process_count:
            raise ValueError(f"{batch_size=} must be a positive multiple of {process_count=}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"{process_index=} must lie in [0, {process_count=})")
        if epochs is not None and epochs < 1:
            raise ValueError(f"{epochs=} must be None (forever) or at least 1")
        if seed < 0:
            raise ValueError(f"{seed=} must be non-negative")
        if not examples:
            raise DataError("no examples to batch")
        self.examples = examples
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.local_batch_size = batch_size // process_count
        self.seed, self.shuffle, self.epochs = seed, shuffle, epochs
        self.drop_last, self.pad_id = drop_last, pad_id
        self.process_index, self.process_count = process_index, process_count
        self.rows = plan_rows([len(e.tokens) - 1 for e in examples], seq_len=seq_len,
                              packing=packing)
        n = len(self.rows)
        self.steps_per_epoch = n // batch_size if drop_last else -(-n // batch_size)
        if self.steps_per_epoch == 0:
            raise DataError(f"{n} rows make no full batch of {batch_size=} with drop_last; "
                            "lower the batch size or keep the last partial batch")
        self._epoch, self._index = 0, 0
        self._order_epoch, self._order = None, None

    def state(self) -> dict[str, int]:
        """Where iteration stands: ``{"epoch": e, "index": next batch within epoch e}``."""
        return {"epoch": self._epoch, "index": self._index}

    def restore(self, state: dict[str, Any]) -> None:
        """Continues from a ``state()`` taken on an iterator built with the same arguments."""
        epoch, index = state.get("epoch"), state.get("index")
        if not (isinstance(epoch, int) and isinstance(index, int) and epoch >= 0
                and 0 <= index < self.steps_per_epoch):
            raise ValueError(f"cannot restore {state!r}: expected {{'epoch': int >= 0, 'index': "
                             f"int in [0, {self.steps_per_epoch})}} for this data")
        self._epoch, self._index = epoch, index

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.epochs is not None and self._epoch >= self.epochs:
            raise StopIteration
        start = self._index * self.batch_size
        global_rows = self._epoch_order()[start:start + self.batch_size]
        b = self.local_batch_size
        local = global_rows[self.process_index * b:(self.process_index + 1) * b]
        rows = [self.rows[j] for j in local] + [()] * (b - len(local))
        batch = make_batch(self.examples, rows, seq_len=self.seq_len, pad_id=self.pad_id)
        self._index += 1
        if self._index == self.steps_per_epoch:
            self._epoch, self._index = self._epoch + 1, 0
        return batch

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self._epoch:
            n = len(self.rows)
            rng = np.random.default_rng([self.seed, self._epoch])
            self._order = rng.permutation(n) if self.shuffle else np.arange(n)
            self._order_epoch = self._epoch
        return self._order


class Prefetch:
    """``(prepare(batch), state)`` for each batch of a BatchIterator, prepared ``depth`` batches ahead.

    A background thread takes the next batch, runs ``prepare`` on it (the trainer reshapes it and puts
    it on the devices) and queues the result with ``batches.state()`` as it stood right after that
    batch: the state to save once the batch's step is done (the iterator itself runs ahead, so its
    own ``state()`` is not). ``depth=0`` prepares each batch on the caller's thread when asked. Either
    way the items come in the iterator's order; an error in the thread is raised by ``next``, and
    the end of the batches is StopIteration. ``close()`` stops the thread (call it when done early).

    Example:
      >>> batches = Prefetch(it, lambda b: put_batch(b, mesh, 1), depth=2)
      >>> device_batch, state = next(batches)     # state: what `it.state()` was after this batch
    """

    def __init__(self, batches: BatchIterator, prepare, *, depth: int = 2):
        if depth < 0:
            raise ValueError(f"{depth=} must be >= 0 (0: prepare each batch when it is asked for)")
        self.batches, self.prepare, self.depth = batches, prepare, depth
        self._thread = None
        if depth:
            import queue
            import threading
            self._queue = queue.Queue(maxsize=depth)
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._fill, name="jlora-prefetch", daemon=True)
            self._thread.start()

    def _produce(self):
        batch = next(self.batches)
        return self.prepare(batch), self.batches.state()

    def _fill(self):
        import queue
        while not self._stop.is_set():
            try:
                item = ("item", self._produce())
            except StopIteration:
                item = ("end", None)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer's thread
                item = ("error", e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[0] != "item":
                return

    def __iter__(self):
        return self

    def __next__(self):
        if not self.depth:
            return self._produce()
        kind, value = self._queue.get()
        if kind == "end":
            self._queue.put((kind, value))  # every later call ends too
            raise StopIteration
        if kind == "error":
            self._queue.put((kind, value))
            raise value
        return value

    def close(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get_nowait()  # unblocks a put
            except Exception:  # noqa: BLE001 - queue.Empty
                pass
            self._thread.join(timeout=0.05)
        self._thread = None
