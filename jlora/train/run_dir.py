"""The run directory `--out`: refuse to mix runs, replace one safely (`--overwrite`), resume only what
resumes exactly (`--resume`).

- A directory holding a run (metrics.jsonl, checkpoints/ or run_config.json) is refused unless `--resume`
  or `--overwrite`.
- `--overwrite` touches nothing until the new run's data, model and settings have been checked; then the
  old run's files move to the sibling `<out>.previous`, which is deleted once the new run has written its
  first checkpoint. A run that fails before that leaves the old one in `<out>.previous`.
- `--resume` compares the settings with the saved run_config.json: a change to one of RESUME_FIELDS
  changes the training trajectory, so the resumed run would not equal an uninterrupted one; it is refused
  naming the fields, unless `--force`. A change to one of NOTED_FIELDS (how the step computes: remat, the
  attention backend, the loss chunk) changes results only by float rounding: it is allowed and logged.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from jlora.train.config import TrainConfig, flag

MARKERS = ("metrics.jsonl", "checkpoints", "run_config.json")
RUN_FILES = MARKERS + ("adapter", "merged", "loss.png", "samples.jsonl")
RESUME_FIELDS = ("model", "data", "eval", "eval_fraction", "r", "lora_alpha", "lora_dropout", "use_rslora",
                 "targets", "lr", "lr_schedule", "warmup_steps", "weight_decay", "max_grad_norm", "steps",
                 "epochs", "batch_size", "grad_accum", "seq_len", "packing", "dtype", "quantize", "seed",
                 "loraplus_lr_ratio", "use_dora", "modules_to_save", "trainable_token_indices")
NOTED_FIELDS = ("remat", "attention", "loss_chunk_tokens")
_PATHS = ("model", "data", "eval")


class RunDirError(RuntimeError):
    """The output directory holds another run, or a run that these settings would not resume exactly."""


def previous_dir(out: Path) -> Path:
    """Where `--overwrite` keeps the replaced run until the new one's first checkpoint: `<out>.previous`."""
    out = Path(out).resolve()
    return out.with_name(out.name + ".previous")


def check(config: TrainConfig, log=print) -> None:
    """Read-only checks of `--out` against the settings; raises RunDirError."""
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file; expected a run directory")
    found = [p for p in MARKERS if (out / p).exists()]
    if found and not (config.resume or config.overwrite):
        raise RunDirError(f"{out} holds another run ({', '.join(found)}); pass --resume to continue it or "
                          f"--overwrite to replace it (the old run is kept in {previous_dir(out)} until the "
                          f"new run's first checkpoint)")
    saved_path = out / "run_config.json"
    if config.resume and saved_path.is_file():
        try:
            saved = json.loads(saved_path.read_text())
            if not isinstance(saved, dict):
                raise ValueError(f"expected a JSON object, found {type(saved).__name__}")
        except (OSError, ValueError) as e:
            if not config.force:
                raise RunDirError(f"{saved_path}: cannot read the run's settings ({e}); pass --force to resume "
                                  f"without comparing them") from None
            saved = {}
        diffs = differences(saved, config)
        if diffs and not config.force:
            raise RunDirError(f"--resume: these settings differ from the run in {out} ({saved_path.name}): "
                              f"{'; '.join(diffs)}. They change the training trajectory, so the run would not "
                              f"continue as it would have; pass the saved values, or add --force to resume "
                              f"with the new ones")
        if diffs:
            log(f"--resume --force: continuing with settings that differ from {saved_path}: {'; '.join(diffs)}")
        noted = differences(saved, config, NOTED_FIELDS)
        if noted:
            log(f"--resume: {'; '.join(noted)}; these change how the step computes, not what (results differ "
                f"by float rounding only)")


def differences(saved: dict, config: TrainConfig, fields: tuple[str, ...] = RESUME_FIELDS) -> list[str]:
    """`--lr 0.001 (the run has 0.0002)` for each of `fields` whose value changed."""
    out = []
    for name in fields:
        if name not in saved:
            continue
        new, old = getattr(config, name), saved[name]
        if name == "remat" and isinstance(old, bool):
            old = "full" if old else "none"  # run_config.json from before the policies
        if name in _PATHS and new is not None and old is not None:
            same = Path(new).resolve() == Path(old).resolve()
        else:
            same = new == old
        if not same:
            out.append(f"{flag(name)} {new} (the run has {old})")
    return out


def set_aside(out: Path, log=print) -> Path | None:
    """Moves the run in `out` to `<out>.previous` (for `--overwrite`, after the new run's checks passed).

    The files move into `<out>.previous.partial`, which is renamed to `<out>.previous` once all are there; a
    move cut short by a crash is finished by the next call. If `<out>.previous` already exists, an earlier
    `--overwrite` stopped before its first checkpoint: when `out` holds no checkpoint either, `out`'s files are
    that unfinished run and are removed, keeping the older complete run; otherwise it is stale and replaced."""
    out = Path(out)
    previous = previous_dir(out)
    staging = previous.with_name(previous.name + ".partial")
    present = [out / p for p in RUN_FILES if (out / p).exists()]
    if not present and not staging.exists():
        return None
    if previous.exists() and not staging.exists() and not _has_checkpoint(out):
        for p in present:
            _remove(p)
        log(f"--overwrite: removed the unfinished run in {out}; the run before it stays in {previous} until "
            f"this run's first checkpoint")
        return previous
    staging.mkdir(parents=True, exist_ok=True)
    for p in present:
        p.rename(staging / p.name)
    if previous.exists():
        _remove(previous)
    staging.rename(previous)
    log(f"--overwrite: moved the earlier run to {previous}; it is deleted once this run saves its first "
        f"checkpoint")
    return previous


def drop_previous(out: Path) -> None:
    """Deletes `<out>.previous` (the new run has a checkpoint now)."""
    previous = previous_dir(out)
    if previous.exists():
        _remove(previous)


def _has_checkpoint(out: Path) -> bool:
    directory = out / "checkpoints"
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
