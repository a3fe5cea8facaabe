"""Fixtures for the data tests: the default tokenizer, built once per session."""

import json

import pytest
import transformers

from jlora.default import build_tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture
def write_jsonl(tmp_path):
    """write_jsonl(rows, name=...) -> path; a row that is a str is written verbatim."""

    def write(rows, name="data.jsonl"):
        path = tmp_path / name
        lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        return path

    return write
