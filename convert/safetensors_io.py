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

from jlora.atomic_files import new_file_mode


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
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header: expected a JSON object, "
                              f"found {type(header).__name__}")
    header.pop("__metadata__", None)
    for name, entry in header.items():
        _check_entry(path, name, entry)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file: its header promises {8 + n + end} bytes, the file has {size}")
    return header


# Bytes per element of the safetensors dtypes whose byte spans the header check verifies.
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def _check_entry(path: Path, name: str, entry) -> None:
    """One header entry: {"dtype": known, "shape": [ints >= 0], "data_offsets": [begin, end]} with
    end - begin = prod(shape) * bytes per element."""
    def bad(found):
        return CheckpointError(f"{path}: corrupt safetensors header: tensor {name!r} {found}; expected "
                               '{"dtype", "shape", "data_offsets": [begin, end]}')
    if not isinstance(entry, dict):
        raise bad(f"is {entry!r}")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or not dtype:
        raise bad(f"has dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise bad(f"has shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise bad(f"has data_offsets {offsets!r}")
    if dtype not in DTYPE_BYTES:
        return  # a newer dtype: safetensors itself checks it when the tensor is read
    want = int(np.prod(shape, dtype=np.int64)) * DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != want:
        raise bad(f"spans {offsets[1] - offsets[0]} bytes, its dtype and shape {shape} need {want}")


def iter_tensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, numpy array) one tensor at a time, so peak memory stays at one tensor."""
    header = read_header(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            for name in header:
                yield name, f.get_tensor(name)
    except (CheckpointError, GeneratorExit):
        raise
    except Exception as e:  # noqa: BLE001 - safetensors' own SafetensorError is no ValueError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot read safetensors file: {first}") from e


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v["shape"]) for k, v in read_header(path).items()}


def write_atomic(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Writes a safetensors file under a temporary name and renames it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, new_file_mode(path))  # mkstemp made it 0600: readable by its owner only
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

