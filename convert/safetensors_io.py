"""Reading and writing safetensors files with errors that name the file, and atomic writes.

A safetensors file is `u64 header_len | JSON header | data`; each header entry gives dtype, shape
and [begin, end) byte offsets into data. A file shorter than the header promises is truncated.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file


class CheckpointError(ValueError):
    """A checkpoint file or directory that cannot be read as expected."""


def read_header(path: Path) -> dict:
    """The header dict (without `__metadata__`), after checking the file holds every byte it promises."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, expected at least an 8-byte header)")
        (n,) = struct.unpack("<Q", raw)
        if 8 + n > size:
            raise CheckpointError(f"{path}: truncated safetensors file: header of {n} bytes, file has {size} bytes")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file: its header promises {8 + n + end} bytes, the file has {size}")
    return header


def iter_tensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, numpy array) one tensor at a time, so peak memory stays at one tensor."""
    header = read_header(path)
    with safe_open(str(path), framework="numpy") as f:
        for name in header:
            yield name, f.get_tensor(name)


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v["shape"]) for k, v in read_header(path).items()}


def write_atomic(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Writes a safetensors file under a temporary name and renames it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
