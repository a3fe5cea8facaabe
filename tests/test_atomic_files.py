"""jlora.atomic_files: whole-directory swaps and file writes keep the user's data and permissions."""
import errno
import os
import stat
import tempfile
from pathlib import Path

import pytest

from jlora import atomic_files
from jlora.atomic_files import atomic_directory, write_bytes, write_text


def _mode(p):
    return stat.S_IMODE(os.stat(p).st_mode)


def _fill(d, files):
    for name, text in files.items():
        (d / name).write_text(text)


def _listing(d):
    return {p.name: p.read_text() for p in d.iterdir()}


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_replaces_the_whole_directory_and_leaves_nothing_beside_it(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _fill(out, {"model.safetensors": "A", "config.json": "A"})
    with atomic_directory(out) as tmp:
        _fill(tmp, {"model-00001-of-00002.safetensors": "B", "config.json": "B"})
    assert _listing(out) == {"model-00001-of-00002.safetensors": "B", "config.json": "B"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failure_leaves_the_old_directory_and_no_debris(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _fill(out, {"a": "old"})
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            _fill(tmp, {"a": "new"})
            raise RuntimeError("disk full")
    assert _listing(out) == {"a": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_new_files_and_directories_get_the_umask_modes(tmp_path, umask022):
    out = tmp_path / "fresh"
    with atomic_directory(out) as tmp:
        write_text(tmp / "config.json", "{}")
    assert _mode(out) == 0o755 and _mode(out / "config.json") == 0o644


def test_a_replaced_directory_and_file_keep_their_modes(tmp_path, umask022):
    out = tmp_path / "shared"
    out.mkdir()
    os.chmod(out, 0o2770)
    with atomic_directory(out) as tmp:
        (tmp / "x").write_text("1")
    assert _mode(out) == 0o2770
    f = tmp_path / "secret.json"
    f.write_text("{}")
    os.chmod(f, 0o600)
    write_text(f, '{"a": 1}')
    assert _mode(f) == 0o600 and f.read_text() == '{"a": 1}'


def test_current_directory_its_parents_and_home_are_refused(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    _fill(work, {"notes.txt": "mine"})
    monkeypatch.chdir(work)
    for target in (Path("."), work, tmp_path, Path.home()):
        with pytest.raises(ValueError, match="current directory, one of its parents or the home"):
            with atomic_directory(target):
                pass
    assert _listing(work) == {"notes.txt": "mine"} and Path.cwd() == work


def test_a_directory_that_cannot_be_renamed_is_swapped_entry_by_entry(tmp_path, monkeypatch):
    """A mount point (EBUSY on rename) keeps its inode; its entries are replaced."""
    out = tmp_path / "volume"
    out.mkdir()
    _fill(out, {"old.safetensors": "A"})
    real_replace = os.replace

    def replace(src, dst):
        if Path(src) == out:
            raise OSError(errno.EBUSY, "Device or resource busy", str(src))
        return real_replace(src, dst)

    monkeypatch.setattr(atomic_files.os, "replace", replace)
    inode = os.stat(out).st_ino
    with atomic_directory(out) as tmp:
        _fill(tmp, {"new.safetensors": "B"})
    assert _listing(out) == {"new.safetensors": "B"} and os.stat(out).st_ino == inode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["volume"]


def test_read_only_parent_builds_inside(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    _fill(out, {"a": "old"})
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp(prefix=None, dir=None):
        if Path(dir) == tmp_path:
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real_mkdtemp(prefix=prefix, dir=dir)

    monkeypatch.setattr(atomic_files.tempfile, "mkdtemp", mkdtemp)
    with atomic_directory(out) as tmp:
        assert tmp.parent == out
        _fill(tmp, {"b": "new"})
    assert _listing(out) == {"b": "new"}


def test_a_crash_between_the_renames_is_repaired_by_the_next_swap(tmp_path):
    out = tmp_path / "out"
    old = tmp_path / ".out.old-abc"   # the previous export, renamed aside, then the process died
    old.mkdir()
    _fill(old, {"a": "previous"})
    half = tmp_path / ".out.new-xyz"  # a half-written export of a killed run
    half.mkdir()
    _fill(half, {"a": "half"})
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            raise RuntimeError("this attempt fails too")
    assert _listing(out) == {"a": "previous"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_write_bytes_new_file_mode(tmp_path, umask022):
    write_bytes(tmp_path / "f.bin", b"x")
    assert _mode(tmp_path / "f.bin") == 0o644 and (tmp_path / "f.bin").read_bytes() == b"x"


def test_safetensors_files_get_the_umask_mode(tmp_path, umask022):
    import numpy as np
    from jlora.convert.safetensors_io import write_atomic
    write_atomic(tmp_path / "model.safetensors", {"w": np.zeros(2, np.float32)})
    assert _mode(tmp_path / "model.safetensors") == 0o644


def test_a_symlinked_directory_swaps_its_target_and_keeps_the_link(tmp_path):
    target = tmp_path / "real"
    target.mkdir()
    _fill(target, {"a": "old"})
    link = tmp_path / "link"
    link.symlink_to(target)
    with atomic_directory(link) as tmp:
        _fill(tmp, {"b": "new"})
    assert link.is_symlink() and _listing(target) == {"b": "new"}


def test_dot_and_trailing_slash_name_the_directory_itself(tmp_path, monkeypatch):
    out = tmp_path / "parent" / "out"
    out.mkdir(parents=True)
    monkeypatch.chdir(out.parent)
    with atomic_directory("out/") as tmp:
        _fill(tmp, {"c": "new"})
    assert _listing(out) == {"c": "new"}
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]
