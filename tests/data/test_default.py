"""The embedded default's assets: bundled dataset and demo tokenizer."""

import hashlib
import json
import os
import pathlib
import subprocess
import sys


from jlora.data import load_examples
from jlora.default import build_tokenizer, dataset_paths
from jlora.default import make_dataset


def _digests(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(pathlib.Path(directory).iterdir())}


def test_dataset_files_are_bundled_and_small():
    train, held = dataset_paths()
    assert train.is_file() and held.is_file()
    assert train.stat().st_size + held.stat().st_size < 300_000


def test_dataset_regenerates_byte_identical(tmp_path):
    train, held = make_dataset.make_examples()
    make_dataset.write_jsonl(tmp_path / "train.jsonl", train)
    make_dataset.write_jsonl(tmp_path / "eval.jsonl", held)
    bundled_train, bundled_eval = dataset_paths()
    assert (tmp_path / "train.jsonl").read_bytes() == bundled_train.read_bytes()
    assert (tmp_path / "eval.jsonl").read_bytes() == bundled_eval.read_bytes()


def test_dataset_shape():
    train_path, eval_path = dataset_paths()
    train = [json.loads(line) for line in train_path.read_text().splitlines()]
    held = [json.loads(line) for line in eval_path.read_text().splitlines()]
    assert 1000 <= len(train) <= 3000 and 100 <= len(held) <= 200
    assert all(set(ex) == {"prompt", "completion"} for ex in train + held)
    assert not {json.dumps(ex) for ex in held} & {json.dumps(ex) for ex in train}


def test_tokenizer_files_byte_identical_across_runs_and_processes(tmp_path):
    assert build_tokenizer(tmp_path / "a") == build_tokenizer(tmp_path / "b")
    code = "import sys; from jlora.default import build_tokenizer; build_tokenizer(sys.argv[1])"
    env = dict(os.environ, PYTHONHASHSEED="12345", RAYON_NUM_THREADS="3")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "c")], check=True, env=env)
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b") == _digests(tmp_path / "c")
    assert "tokenizer.json" in _digests(tmp_path / "a")


def test_tokenizer_loads_with_auto_tokenizer(tokenizer_dir, tokenizer):
    n = build_tokenizer(tokenizer_dir / "again")
    assert n == len(tokenizer) == 512
    special = (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)
    assert special == ("<s>", "</s>", "<pad>")
    ids = tokenizer("Q: What is 12 plus 3?")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Q: What is 12 plus 3?"
    digits = tokenizer.encode(" 12", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(digits) == ["Ġ", "1", "2"]
    text = "unseen text: Zürich, 東京 ✓"  # byte-level: anything round-trips
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_tokenizer_chat_template(tokenizer):
    messages = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<s><|user|>\nHi?\n<|assistant|>\nHello.</s>")
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<s><|user|>\nHi?\n<|assistant|>\n"


def test_bundled_data_tokenizes_without_truncation(tokenizer):
    for path in dataset_paths():
        examples, stats = load_examples(path, tokenizer, seq_len=64)
        assert stats.truncated == stats.skipped == 0
        assert max(len(e.tokens) for e in examples) <= 48
