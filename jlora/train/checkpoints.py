"""Atomic, resumable training checkpoints with orbax: adapters + optimizer state + step + data position + RNG.

Each step directory is written under a temporary name and renamed when complete (orbax), so a run
killed mid-save leaves the previous checkpoint intact; the last `keep` are kept.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from jlora.convert.safetensors_io import CheckpointError
from jlora.train import layer_layout


class Checkpoints:
    def __init__(self, directory: Path, keep: int = 3):
        self.directory = Path(directory).resolve()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, train_state: dict[str, Any], meta: dict[str, Any]) -> None:
        """train_state: {"params", "opt_state"} pytrees; meta: JSON (data position, rng seed, config)."""
        _ignore_closed_loop_callbacks()
        _drop_orphaned_write_reports()
        try:
            with _orbax_quiet():
                self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(train_state),
                                                                meta=ocp.args.JsonSave(meta)))
                self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore errors (a full disk, permissions) in one line
            raise CheckpointError(f"{self.directory / str(step)}: could not write the checkpoint "
                                  f"({_first_line(e)}); the previous checkpoint is kept") from e

    def restore(self, step: int, like: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restores into the structure, dtypes and shardings of `like`. A checkpoint saved in the other
        layer layout (scanned vs loop: jlora/train/layer_layout.py) is restored in its own and mapped."""
        where = self.directory / str(step)
        saved = self._saved_shapes(step)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        wanted = _shapes(like)
        if saved is not None and layer_layout.is_scanned(saved) != layer_layout.is_scanned(wanted):
            return self._restore_other_layout(step, where, saved, abstract, wanted)
        return self._restore_as(step, where, saved, abstract, wanted)

    def _restore_as(self, step: int, where: Path, saved: dict | None, abstract, shapes: dict[str, tuple]):
        """(state, meta) of `step` restored into `abstract` (whose `_shapes` are `shapes`), once every array's
        presence and shape match the checkpoint's (`saved`); orbax's errors in one line."""
        _check_matches(where, saved, shapes)
        try:
            with _orbax_quiet():
                out = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - orbax's messages run to many lines
            raise CheckpointError(f"{where}: cannot restore the checkpoint ({_first_line(e)})") from e
        return out["state"], out["meta"]

    def _restore_other_layout(self, step: int, where: Path, saved: dict, abstract: dict, wanted: dict):
        """The checkpoint restored in the layout it was saved in, then its layer names mapped to this run's."""
        L = layer_layout
        if L.is_scanned(saved):  # this run loops
            p, groups = L.period_and_groups(saved)
            as_saved = L.map_name_dicts(abstract, lambda d: L.to_scanned(d, p, groups, L.abstract_stack))
            back = lambda d: L.to_loop(d, p, groups, L.value_row)  # noqa: E731
        else:  # this run scans
            p, groups = L.period_and_groups(wanted)
            as_saved = L.map_name_dicts(abstract, lambda d: L.to_loop(d, p, groups, L.abstract_row))
            back = lambda d: L.to_scanned(d, p, groups, L.value_stack)  # noqa: E731
        state, meta = self._restore_as(step, where, saved, as_saved, _shapes(as_saved))
        state = L.map_name_dicts(state, back)
        state = jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), state, abstract)
        return state, meta

    def _saved_shapes(self, step: int) -> dict[str, tuple] | None:
        """{"params.<path>": shape} of the saved train state, or None when orbax cannot say."""
        try:
            handler = ocp.StandardCheckpointHandler()
            tree = handler.metadata(epath.Path(self.directory / str(step) / "state")).tree
            handler.close()
        except Exception:  # noqa: BLE001 - then the restore itself reports what is wrong
            return None
        return _shapes(tree)

    def delete(self, step: int) -> None:
        self.manager.delete(step)

    def close(self):
        self.manager.close()


def _first_line(e: BaseException) -> str:
    """The cause in a few words: the OS error tensorstore reports (a full disk), else the first line."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    code = re.search(r"os_error_code='?(\d+)", str(e))
    if code:
        return f"{os.strerror(int(code[1]))} (errno {code[1]})"
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    first = lines[0] if lines else ""
    return f"{type(e).__name__}: {first[:300]}" if first else type(e).__name__


def _ignore_closed_loop_callbacks() -> None:
    """When a save fails, tensorstore completes the writes still in flight and calls back into orbax's
    event loop, already closed: each callback raises RuntimeError("Event loop is closed") through
    sys.unraisablehook, a traceback apiece (dozens), during the save and after it. Those, and only those,
    are dropped (installed once, before the first save)."""
    previous = sys.unraisablehook
    if getattr(previous, "_jlora_closed_loop_filter", False):
        return

    def hook(unraisable):
        e = unraisable.exc_value
        if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
            return
        previous(unraisable)

    hook._jlora_closed_loop_filter = True
    sys.unraisablehook = hook


class _OrphanedWrites(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        first = record.getMessage().split("\n", 1)[0]  # asyncio: "Task exception was never retrieved\nfuture: ..."
        return not (first.endswith("exception was never retrieved")
                    or "_SignalingThread.run() raised an exception" in first)


def _drop_orphaned_write_reports() -> None:
    """When a save fails (reported in one line), orbax's other writer threads log their tracebacks (absl
    ERROR) and asyncio logs each failed write task when it is collected ("Task exception was never
    retrieved"), dozens of times, during the save and after it: those messages, and only those, are
    dropped (installed once, before the first save; jlora runs no other asyncio code)."""
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OrphanedWrites) for f in logger.filters):
            logger.addFilter(_OrphanedWrites())


@contextlib.contextmanager
def _orbax_quiet():
    """orbax logs each failing writer thread's traceback (absl ERROR) before raising; the error raised
    from save/restore says what failed in one line, so those logs are held back while it runs."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _shapes(tree) -> dict[str, tuple]:
    """{"params.<path>": shape} of every array in a train-state pytree (arrays, abstract ones, orbax metadata)."""
    return {jax.tree_util.keystr(k, simple=True, separator="."): tuple(v.shape)
            for k, v in jax.tree_util.tree_flatten_with_path(tree)[0] if hasattr(v, "shape")}


def _check_matches(where: Path, saved: dict[str, tuple] | None, wanted: dict[str, tuple]) -> None:
    """One line naming the first array whose presence or shape differs between checkpoint (`saved`) and run
    (`wanted`), both `_shapes`."""
    if saved is None:
        return
    hint = "it was saved with other LoRA settings (r, targets); resume with those or start a new --out"
    for name in sorted(set(saved) | set(wanted), key=lambda n: (not n.startswith("params"), n)):
        if name not in saved:
            raise CheckpointError(f"{where}: the checkpoint has no {name}, which this run trains: {hint}")
        if name not in wanted:
            raise CheckpointError(f"{where}: the checkpoint holds {name}, which this run does not train: {hint}")
        if saved[name] != wanted[name]:
            raise CheckpointError(f"{where}: {name} has shape {saved[name]} in the checkpoint, this run needs "
                                  f"{wanted[name]}: {hint}")
