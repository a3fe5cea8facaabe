"""Atomic writes: a reader (or a crash) sees the old content or the new, never a mix.

Files: write to a temporary sibling, fsync, then `os.replace` (atomic within one filesystem).
Directories: build the whole new directory as a temporary sibling, then swap it in:

    with atomic_directory(out) as tmp:      # tmp is an empty sibling of `out`
        write_everything_into(tmp)          # an exception here leaves `out` untouched, tmp removed
    # here `out` holds exactly what was written into tmp; the old `out` is gone

The swap renames the old directory aside (`.<name>.old-*`), renames the new one into place, and only
then deletes the old one, so at every instant either the old or the new complete directory exists
under its name (or, for the two-rename gap, the old one is still on disk beside it).

This module imports nothing from jlora: every layer (convert, train, ranks, commands) may use it.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["write_text", "write_json", "write_bytes", "atomic_directory"]


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` through a temporary sibling and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` (UTF-8) to `path` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj, *, indent: int | None = 2) -> None:
    """Writes `obj` as JSON to `path` atomically (with a trailing newline)."""
    write_text(path, json.dumps(obj, indent=indent) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty temporary sibling of `path`; on success it replaces `path` as a whole.

    On an exception the temporary directory is removed and `path` is left exactly as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a directory; expected a directory to replace")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.new-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.rmdir(old)
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
