"""Readers for JSONL, parquet, CSV and saved datasets: the same rows give the same records, examples and
batches in every format (files written by pandas / datasets, the independent writers)."""
import json

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")
pd = pytest.importorskip("pandas")

from jlora.data import BatchIterator, DataError  # noqa: E402
from jlora.data.load import load_examples  # noqa: E402
from jlora.data.readers import Columns, iter_records, read_records  # noqa: E402

ROWS = [
    {"prompt": f"Q: what is {i} + {i + 3}?\nA:", "completion": f" {2 * i + 3}", "id": i} for i in range(23)
] + [{"prompt": "Q: a comma, a \"quote\"\nand a newline?\nA:", "completion": " yes, ünïcode", "id": 23}]
TEXT_ROWS = [{"body": f"line {i}: " + "ab" * i} for i in range(7)]


def _write_all(rows, tmp_path, name="data"):
    """The same rows as JSONL, parquet, CSV and a save_to_disk directory."""
    paths = {"jsonl": tmp_path / f"{name}.jsonl", "parquet": tmp_path / f"{name}.parquet",
             "csv": tmp_path / f"{name}.csv", "saved": tmp_path / f"{name}_saved"}
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    frame = pd.DataFrame(rows)
    frame.to_parquet(paths["parquet"])
    frame.to_csv(paths["csv"], index=False)
    datasets.Dataset.from_list(rows).save_to_disk(str(paths["saved"]))
    return paths


def test_same_records_in_every_format(tmp_path):
    paths = _write_all(ROWS, tmp_path)
    want = [{"prompt": r["prompt"], "completion": r["completion"]} for r in ROWS]
    for kind, path in paths.items():
        records = read_records(path)
        assert [{k: r.data[k] for k in ("prompt", "completion")} for r in records] == want, kind
        assert [r.data["id"] for r in records] == list(range(24)), f"{kind}: other columns kept (and ignored)"
    assert [r.line for r in read_records(paths["csv"])][:2] == [2, 3], "CSV: the file line (after the header)"
    assert [r.line for r in read_records(paths["parquet"])][:2] == [1, 2], "parquet: the row number"


def test_same_batches_and_resume_in_every_format(tmp_path, tokenizer):
    """Same examples in the same order, hence the same batches, and a resumed iterator continues alike."""
    paths = _write_all(ROWS, tmp_path)
    batches = {}
    for kind, path in paths.items():
        examples, stats = load_examples(path, tokenizer, seq_len=32)
        it = BatchIterator(examples, seq_len=32, batch_size=4, packing=True, seed=3)
        next(it)
        resumed = BatchIterator(examples, seq_len=32, batch_size=4, packing=True, seed=3)
        resumed.restore(it.state())
        batches[kind] = (stats, next(it), next(resumed))
    ref_stats, ref_batch, _ = batches["jsonl"]
    for kind, (stats, batch, after_resume) in batches.items():
        assert stats == ref_stats, kind
        for key in ref_batch:
            np.testing.assert_array_equal(batch[key], ref_batch[key], err_msg=f"{kind} {key}")
            np.testing.assert_array_equal(after_resume[key], batch[key], err_msg=f"{kind} resumed {key}")


def test_column_mapping(tmp_path):
    paths = _write_all(TEXT_ROWS, tmp_path, "text")
    for kind, path in paths.items():
        records = read_records(path, Columns(text="body"))
        assert [r.data for r in records] == [{"text": r["body"]} for r in TEXT_ROWS], kind


def test_messages_column_from_parquet_and_saved(tmp_path):
    rows = [{"conv": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"yo {i}"}]}
            for i in range(3)]
    paths = _write_all(rows, tmp_path, "chat")
    for kind in ("jsonl", "parquet", "saved"):
        assert [r.data for r in read_records(paths[kind], Columns(messages="conv"))] == \
               [{"messages": r["conv"]} for r in rows], kind


def test_missing_column_is_named_with_the_columns(tmp_path):
    paths = _write_all(TEXT_ROWS, tmp_path, "text")
    for kind, path in paths.items():
        with pytest.raises(DataError, match=r"no column 'content' \(mapped to the text field\); the dataset has "
                                            r"columns \['body'\]"):
            read_records(path, Columns(text="content"))
        with pytest.raises(DataError, match=r"none of the columns \['body'\] holds a jlora field"):
            next(iter_records(path))


def test_rows_are_read_lazily(tmp_path):
    """Records come one at a time: a JSONL file whose line 3 is broken yields lines 1-2 before the error, and
    a streamed parquet file yields its first record from an iterator."""
    paths = _write_all(ROWS, tmp_path)
    it = iter_records(paths["parquet"])
    assert next(it).data["completion"] == " 3"
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a"}\n{"text": "b"}\n{"text": \n', encoding="utf-8")
    it = iter_records(broken)
    assert [next(it).data, next(it).data] == [{"text": "a"}, {"text": "b"}]
    with pytest.raises(DataError, match=r"broken\.jsonl:3: malformed JSON"):
        next(it)


def test_unknown_format(tmp_path):
    (tmp_path / "data.xlsx").write_text("x")
    with pytest.raises(DataError, match=r"data\.xlsx: cannot tell the data format.*\.jsonl, \.parquet or \.csv"):
        read_records(tmp_path / "data.xlsx")
    with pytest.raises(DataError, match=r"saved_typo: cannot read data file \(no such file or directory\)"):
        read_records(tmp_path / "saved_typo")
