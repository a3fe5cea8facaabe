"""Reading JSONL files into records that remember where they came from."""

import json
import os
from collections.abc import Iterator
from typing import Any, NamedTuple

from jlora.data.errors import DataError


class Record(NamedTuple):
    """One JSON object from a JSONL file, with its file and 1-based line number."""

    data: dict[str, Any]
    path: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def iter_jsonl(path: str | os.PathLike) -> Iterator[Record]:
    """Yields one Record per non-blank line, reading the file line by line (never whole).

    Raises:
      DataError: the file is missing, or a line is not UTF-8, not JSON, or not a JSON object; the
        message reads ``path:line: what was wrong``.
    """
    path = os.fspath(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read data file ({e.strerror})") from e
    with f:
        for line, raw in enumerate(f, start=1):
            where = f"{path}:{line}"
            try:
                text = raw.decode("utf-8-sig" if line == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from e
            if not text.strip():
                continue
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(data, dict):
                raise DataError(f"{where}: expected a JSON object, found {type(data).__name__}")
            yield Record(data, path, line)


def read_jsonl(path: str | os.PathLike) -> list[Record]:
    """``list(iter_jsonl(path))``; a file with no records is an error (DataError, as iter_jsonl's)."""
    records = list(iter_jsonl(path))
    if not records:
        raise DataError(f"{os.fspath(path)}: no examples (the file is empty)")
    return records
