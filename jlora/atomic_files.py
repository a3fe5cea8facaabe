"""Atomic writes: a reader (or a crash) sees the old content or the new, never a mix.

Files: write to a temporary sibling, fsync, then `os.replace` (atomic within one filesystem).
Directories: build the whole new directory as a temporary sibling, then swap it in:

    with atomic_directory(out) as tmp:      # tmp is an empty directory beside `out`
        write_everything_into(tmp)          # an exception here leaves `out` untouched, tmp removed
    # here `out` holds exactly what was written into tmp; the old `out` is gone

The swap renames the old directory aside (`.<name>.old-*`), renames the new one into place, and only
then deletes the old one, so at every instant the old or the new complete directory exists (for the
gap between the two renames, the old one under its hidden name; the next swap into the same path puts
it back if a crash left it there, and removes a crashed swap's half-written `.<name>.new-*`).

Where `out` itself cannot be renamed (a mount point, e.g. a container volume) or its parent is not
writable, the new tree is built inside `out` and swapped entry by entry (each entry is moved aside, then
the new ones moved in; a failure moves the old ones back).

Permissions are what a plain write would give: new files 0o666 and directories 0o777 less the umask,
or the mode of the file or directory being replaced. The current directory, its ancestors and the
home directory are never replaced (swapping them away would delete a user's working directory).

This module imports nothing from jlora: every layer (convert, train, ranks, commands) may use it.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["write_text", "write_json", "write_bytes", "atomic_directory", "new_file_mode"]

_MOVE_ERRORS = (errno.EBUSY, errno.EXDEV, errno.EACCES, errno.EPERM, errno.ENOTEMPTY, errno.EINVAL)


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask is process-wide)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode(path: str | os.PathLike) -> int:
    """The mode a file written at `path` should get: the replaced file's, else 0o666 less the umask."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


def _new_dir_mode(path: Path) -> int:
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        return 0o777 & ~_umask()


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
        os.chmod(tmp, new_file_mode(path))
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


def _refuse_protected(path: Path) -> None:
    protected = {Path.home().absolute(), Path(path.anchor)}
    with contextlib.suppress(OSError):
        cwd = Path.cwd()
        protected.update([cwd, *cwd.parents])
    resolved = path.resolve()
    if resolved in {p.resolve() for p in protected}:
        raise ValueError(f"{path} is the current directory, one of its parents or the home directory; "
                         f"expected a directory of its own to write into (e.g. {path / 'export'})")


def _tidy_leftovers(path: Path) -> None:
    """Puts back an old directory a crash left between the two renames; removes crashed swaps' debris."""
    if not path.parent.is_dir():
        return
    olds = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not path.exists():
        os.replace(olds.pop(), path)
    for p in [*olds, *path.parent.glob(f".{path.name}.new-*")]:
        shutil.rmtree(p, ignore_errors=True)
    if path.is_dir():
        for p in path.glob(".jlora-swap-*"):
            shutil.rmtree(p, ignore_errors=True)


def _swap_directory(path: Path, tmp: Path) -> None:
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
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _swap_entries(path: Path, tmp: Path) -> None:
    """Replaces the entries of `path` (kept as a directory: a mount point) by those of `tmp`."""
    old = Path(tempfile.mkdtemp(prefix=".jlora-swap-old-", dir=path))
    keep = {tmp.resolve(), old.resolve()}
    moved_old, moved_new = [], []
    try:
        for entry in list(path.iterdir()):
            if entry.resolve() not in keep:
                shutil.move(str(entry), str(old / entry.name))
                moved_old.append(entry.name)
        for entry in list(tmp.iterdir()):
            shutil.move(str(entry), str(path / entry.name))
            moved_new.append(entry.name)
    except BaseException:
        for name in moved_new:
            target = path / name
            shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
        for name in moved_old:
            shutil.move(str(old / name), str(path / name))
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    os.chmod(path, _new_dir_mode(path))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty temporary directory; on success its contents replace `path` as a whole.

    On an exception the temporary directory is removed and `path` is left exactly as it was.
    Refuses (ValueError) the current directory, its parents and the home directory.
    """
    path = Path(path).resolve()  # a symlinked directory: swap its target, keep the link
    _refuse_protected(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a directory; expected a directory to replace")
    path.parent.mkdir(parents=True, exist_ok=True)
    _tidy_leftovers(path)
    mode = _new_dir_mode(path)
    inside = False
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.new-", dir=path.parent))
    except PermissionError:
        if not path.is_dir():
            raise
        inside = True  # the parent is read-only: build inside `path`, swap entry by entry
        tmp = Path(tempfile.mkdtemp(prefix=".jlora-swap-new-", dir=path))
    try:
        yield tmp
        os.chmod(tmp, mode)
        if inside:
            _swap_entries(path, tmp)
        else:
            try:
                _swap_directory(path, tmp)
            except OSError as e:
                if e.errno not in _MOVE_ERRORS or not path.is_dir():
                    raise
                _swap_entries(path, tmp)  # `path` cannot be renamed (a mount point)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
