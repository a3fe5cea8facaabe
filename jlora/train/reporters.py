"""Where a run's metrics go besides metrics.jsonl: TensorBoard event files and Weights & Biases (`--report-to`).

A reporter receives exactly the records metrics.jsonl gets (same keys, same step numbers, eval metrics in
the record of the step they were measured at): `write(record)` per record, `close()` at the end. Each
record `{"step": s, k: v, ...}` becomes one scalar per key `k` at step `s`.

Resume (`--resume` from the checkpoint at step `c`): metrics.jsonl is cut back to steps <= c (the steps after
it run again), and so is every reporter, so no step appears twice:
- tensorboard: the event files under <out>/tensorboard are replaced by a fresh one holding the kept records
  (metrics.jsonl is the source; wall times of replayed points are the replay's), then the new steps follow.
- wandb offline (`WANDB_MODE=offline`): the run keeps its id (<out>/wandb/jlora_run_id); its earlier
  offline-run directories are removed and the kept records replayed into a new one, so `wandb sync` uploads
  one history. Online: the same id is resumed (`resume="allow"`) and records at steps W&B already holds
  (`run.step` after init) are not sent again.

The packages are optional extras (`pip install 'jlora[tensorboard]'`, `'jlora[wandb]'`); `check_installed`
says which one is missing before a run starts. Nothing here imports them until a reporter is opened.
"""
from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import string
from pathlib import Path
from typing import Iterable, Protocol

from jlora.atomic_files import write_text

# name -> (module it needs, the extra that installs it)
PACKAGES = {"tensorboard": ("tensorboardX", "tensorboard"), "wandb": ("wandb", "wandb")}
NAMES = tuple(PACKAGES) + ("none",)


class ReporterError(ValueError):
    """--report-to names an unknown reporter, or one whose package is not installed."""


def parse(report_to: str | Iterable[str] | None) -> tuple[str, ...]:
    """The reporters of a `--report-to` value: a comma list of tensorboard, wandb (or none), in order, once
    each; `none` (or nothing) alone means no reporter."""
    if report_to is None:
        return ()
    items = report_to.split(",") if isinstance(report_to, str) else list(report_to)
    names = [str(x).strip().lower() for x in items if str(x).strip()]
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise ReporterError(f"unknown reporter {unknown[0]!r}: expected a comma list of "
                            f"{', '.join(PACKAGES)} (or none)")
    if "none" in names and len(set(names)) > 1:
        raise ReporterError(f"'none' cannot be combined with other reporters, found {','.join(names)}")
    return tuple(dict.fromkeys(n for n in names if n != "none"))


def check_installed(report_to) -> None:
    """Raises ReporterError, one line naming the extra to install, for a reporter whose package is absent."""
    for name in parse(report_to):
        module, extra = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ReporterError(f"--report-to {name}: the {module} package is not installed; "
                                f"pip install 'jlora[{extra}]'")


class Reporter(Protocol):
    def write(self, record: dict) -> None: ...
    def close(self) -> None: ...


def open_reporters(report_to, out_dir: str | os.PathLike, *, history: list[dict] = (),
                   resumed: bool = False, config: dict | None = None) -> list[Reporter]:
    """One open reporter per name in `report_to`, each already holding `history` (the records metrics.jsonl
    kept); `resumed`: the run continues one in `out_dir` (see the module docstring)."""
    check_installed(report_to)
    opened = []
    try:
        for name in parse(report_to):
            cls = TensorBoardReporter if name == "tensorboard" else WandbReporter
            opened.append(cls(Path(out_dir), history=list(history), resumed=resumed, config=config))
    except BaseException:
        for r in opened:
            r.close()
        raise
    return opened


def scalars(record: dict) -> dict[str, float]:
    """The record's values by key, without "step" (booleans and non-numbers are not scalars)."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardReporter:
    """Event files under <out>/tensorboard, one scalar tag per metrics.jsonl key (tensorboardX's writer)."""

    def __init__(self, out_dir: Path, *, history: list[dict], resumed: bool, config: dict | None = None):
        from tensorboardX import SummaryWriter

        self.logdir = out_dir / "tensorboard"
        if self.logdir.is_dir():  # a resumed run: its events are replayed from metrics.jsonl below
            for old in self.logdir.glob("events.out.tfevents.*"):
                old.unlink()
        self.writer = SummaryWriter(logdir=str(self.logdir), flush_secs=10)
        for record in history:
            self.write(record)
        self.writer.flush()

    def write(self, record: dict) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, global_step=int(record["step"]))

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    """A Weights & Biases run in <out>/wandb (project $WANDB_PROJECT or "jlora", named after the run dir),
    the run's settings as its config; the mode ($WANDB_MODE: online, offline, disabled) is wandb's own."""

    def __init__(self, out_dir: Path, *, history: list[dict], resumed: bool, config: dict | None = None):
        import wandb

        root = out_dir / "wandb"
        root.mkdir(parents=True, exist_ok=True)
        id_file = root / "jlora_run_id"
        run_id = id_file.read_text().strip() if resumed and id_file.is_file() else None
        if run_id is None:
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
            write_text(id_file, run_id + "\n")
        offline = os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun")
        if offline and resumed:  # replaced by one offline run holding the kept history
            for old in root.glob(f"offline-run-*-{run_id}"):
                shutil.rmtree(old, ignore_errors=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "jlora"), name=out_dir.resolve().name,
                              id=run_id, dir=str(out_dir), config=config or {},
                              resume="allow" if resumed and not offline else None)
        self.first_step = 0 if offline else int(getattr(self.run, "step", 0) or 0)
        for record in history:
            self.write(record)

    def write(self, record: dict) -> None:
        step = int(record["step"])
        if step >= self.first_step:  # online resume: steps W&B already holds are not sent twice
            self.run.log(scalars(record), step=step)

    def close(self) -> None:
        import wandb

        self.run.finish()
        if wandb.run is None:
            # wandb (0.31) keeps a finished run's stream in its service process: a run with the same id opened
            # later in this Python process (a resume in the same session) would get an empty history file.
            # Stopping the service (no other run is active) makes the next wandb.init start a fresh one.
            wandb.teardown()
