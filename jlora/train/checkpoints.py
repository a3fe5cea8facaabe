"""Atomic, resumable training checkpoints with orbax: adapters + optimizer state + step + data position + RNG.

Each step directory is written under a temporary name and renamed when complete (orbax), so a run
killed mid-save leaves the previous checkpoint intact; the last `keep` are kept.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpoints:
    def __init__(self, directory: Path, keep: int = 3):
        self.directory = Path(directory).resolve()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, train_state: dict[str, Any], meta: dict[str, Any]) -> None:
        """train_state: {"params", "opt_state"} pytrees; meta: JSON (data position, rng seed, config)."""
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(train_state),
                                                        meta=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()

    def restore(self, step: int, like: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restores into the structure, dtypes and shardings of `like`."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                 meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def close(self):
        self.manager.close()
