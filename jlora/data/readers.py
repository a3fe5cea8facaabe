"""Training records from JSONL, parquet, CSV or a `datasets.Dataset.save_to_disk` directory.

    records = iter_records("train.parquet", Columns(prompt="question", completion="answer"))

Which reader, by path: a directory is a saved dataset (``datasets.load_from_disk``; a DatasetDict
gives its "train" split), ``.parquet`` / ``.csv`` / ``.tsv`` go through ``datasets.load_dataset(...,
streaming=True)`` and ``.jsonl`` / ``.json`` through jlora's own JSONL reader (exact line numbers in
errors). Rows come lazily and in file order: JSONL is read line by line, parquet and CSV are streamed,
a saved dataset is memory-mapped Arrow, so a file larger than memory is never loaded whole; the same rows in any of the
four formats give the same records in the same order, hence the same batches and the same resume
position (``BatchIterator.state()``).

Column mapping: ``Columns`` names the dataset's columns that hold jlora's fields (text, prompt,
completion, messages); each row becomes a record with jlora's field names (other columns kept and
ignored; for the columnar formats a null cell is treated as absent, so one file may mix formats). A column the
mapping names that the dataset lacks is an error naming it and listing the dataset's columns (for
JSONL: the first line's fields).

Records carry ``path`` and ``line``: the file line for JSONL, the line for CSV (row + 1: the header),
the 1-based row number for parquet and saved datasets.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

from jlora.data.errors import DataError
from jlora.data.jsonl import Record, iter_jsonl

STREAMED = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv"}
JSONL = (".jsonl", ".json")


@dataclasses.dataclass(frozen=True)
class Columns:
    """The dataset column holding each of jlora's record fields (``--text-field`` ...)."""

    text: str = "text"
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"

    def renames(self) -> dict[str, str]:
        """{dataset column: jlora field}."""
        return {getattr(self, f.name): f.name for f in dataclasses.fields(self)}

    def custom(self) -> dict[str, str]:
        """{jlora field: column} for the fields mapped away from their default name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) != f.name}


def data_kind(path: str | os.PathLike) -> str:
    """"saved", "parquet", "csv" or "jsonl" for ``path`` (DataError for anything else)."""
    p = Path(path)
    if p.is_dir():
        return "saved"
    suffix = p.suffix.lower()
    if suffix in STREAMED:
        return STREAMED[suffix]
    if suffix in JSONL:
        return "jsonl"
    if not p.exists():
        raise DataError(f"{p}: cannot read data file (no such file or directory)")
    raise DataError(f"{p}: cannot tell the data format from the name; expected a .jsonl, .parquet or .csv file "
                    f"or a directory written by datasets' save_to_disk")


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("reading parquet, CSV or a saved dataset needs the `datasets` package: "
                        "pip install 'jlora[datasets]'") from None
    datasets.disable_progress_bars()
    return datasets


def _check_columns(path: str, found: list[str], columns: Columns) -> None:
    for field, column in columns.custom().items():
        if column not in found:
            raise DataError(f"{path}: no column {column!r} (mapped to the {field} field); the dataset has "
                            f"columns {found}")
    renames = columns.renames()
    if not any(c in renames for c in found):
        raise DataError(f"{path}: none of the columns {found} holds a jlora field; expected "
                        f"{sorted(renames)} or a mapping (--text-field, --prompt-field, --completion-field, "
                        f"--messages-field)")


def _open_saved(path: Path):
    datasets = _datasets()
    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(f"{path}: not a directory written by datasets' save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: a DatasetDict without a 'train' split (splits {list(ds)}); pass the "
                            f"split's directory, e.g. {path / next(iter(ds))}")
        ds = ds["train"]
    return ds, list(ds.column_names)


def _open_streamed(path: Path, kind: str):
    datasets = _datasets()
    if not path.is_file():
        raise DataError(f"{path}: cannot read data file (no such file)")
    kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    ds = datasets.load_dataset(kind, data_files=str(path), split="train", streaming=True, **kwargs)
    names = list(ds.features) if ds.features is not None else None
    if names is None:  # features unknown until the first row
        first = next(iter(ds), None)
        names = list(first) if first is not None else []
    return ds, names


def _rename(data: dict, renames: dict[str, str]) -> dict:
    """Mapped columns under jlora's field names; a field name mapped away (text -> "body") is dropped, any
    other column kept as is (record_format ignores it, and names it when a row has no field set)."""
    fields = set(renames.values())
    return {renames.get(k, k): v for k, v in data.items() if k in renames or k not in fields}


def iter_records(path: str | os.PathLike, columns: Columns = Columns()) -> Iterator[Record]:
    """Yields one Record per row of ``path``, lazily, in file order, with jlora's field names.

    Raises:
      DataError: an unknown format, a file that cannot be read, a mapped column the data lacks (naming
        it and listing the columns), or (JSONL) a malformed line.
    """
    kind = data_kind(path)
    where = os.fspath(path)
    renames = columns.renames()
    if kind == "jsonl":
        for i, r in enumerate(iter_jsonl(path)):
            if i == 0:  # a JSON line's keys are its columns: judged on the first record
                _check_columns(r.where, sorted(r.data), columns)
            yield Record(_rename(r.data, renames), r.path, r.line)
        return
    ds, names = _open_saved(Path(path)) if kind == "saved" else _open_streamed(Path(path), kind)
    _check_columns(where, names, columns)
    first_line = 2 if kind == "csv" else 1
    for i, row in enumerate(ds):
        yield Record(_rename({k: v for k, v in row.items() if v is not None}, renames), where, i + first_line)


def read_records(path: str | os.PathLike, columns: Columns = Columns()) -> list[Record]:
    """``list(iter_records(path, columns))``; a source with no rows is an error."""
    records = list(iter_records(path, columns))
    if not records:
        raise DataError(f"{os.fspath(path)}: no examples (the dataset is empty)")
    return records
