"""`--model` as a Hugging Face Hub id: resolved through the HF cache, offline without network, local dirs as-is."""
import shutil
from pathlib import Path

import numpy as np
import pytest

import jlora
from jlora.convert.hub import ALLOW_PATTERNS, is_hub_id, resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """An empty HF_HOME, offline (the tests never touch the network)."""
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def _cache_snapshot(hf_home, repo: str, source):
    """Lays `source`'s files out as huggingface_hub's cache does: models--org--name/{refs/main,
    blobs/<hash>, snapshots/<sha>/<file> -> ../../blobs/<hash>}."""
    import hashlib
    import os

    root = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    (root / "blobs").mkdir()
    snapshot = root / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for f in sorted(Path(source).iterdir()):
        blob = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, root / "blobs" / blob)
        os.symlink(os.path.join("..", "..", "blobs", blob), snapshot / f.name)
    return snapshot


def _sharded_copy(source, out):
    """`source` rewritten as two shards plus model.safetensors.index.json (transformers' sharded layout)."""
    import json

    from jlora.convert.safetensors_io import iter_tensors, write_atomic
    shutil.copytree(source, out)
    tensors = dict(iter_tensors(out / "model.safetensors"))
    (out / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        write_atomic(out / shard, {n: tensors[n] for n in part}, metadata={"format": "pt"})
        weight_map.update({n: shard for n in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


@pytest.mark.parametrize("name, hub", [
    ("meta-llama/Llama-3.2-1B", True), ("Qwen/Qwen2.5-0.5B-Instruct@main", True),
    ("./meta-llama/Llama", False), ("/abs/dir", False), ("~/models/x", False), ("a/b/c", False),
    ("runs/demo/", False), ("../x/y", False), ("gpt2", False),
])
def test_what_reads_as_a_hub_id(name, hub):
    assert is_hub_id(name) is hub


def test_local_directory_is_used_as_is(checkpoint, hf_home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = shutil.copytree(checkpoint("llama"), tmp_path / "org" / "tiny")
    _cache_snapshot(hf_home, "org/tiny", checkpoint("mistral"))  # same name in the cache: not used
    assert resolve_model("org/tiny") == local.relative_to(tmp_path)
    assert jlora.load_hf("org/tiny").config.model_type == "llama"


def test_cached_snapshot_resolves_offline(checkpoint, hf_home, tmp_path, monkeypatch, rel):
    monkeypatch.chdir(tmp_path)  # no ./org/tiny here
    snapshot = _cache_snapshot(hf_home, "org/tiny", checkpoint("llama"))
    assert resolve_model("org/tiny") == snapshot
    ids = np.arange(12)[None]
    assert rel(jlora.load_hf("org/tiny")(ids), jlora.load_hf(checkpoint("llama"))(ids)) == 0


def test_uncached_id_offline_is_one_clear_error(hf_home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(jlora.CheckpointError, match=r"'org/absent'.*could not be fetched.*HF_HUB_OFFLINE.*"
                                                    r"local checkpoint directory"):
        jlora.load_hf("org/absent")


def test_only_what_jlora_reads_is_downloaded():
    import fnmatch
    wanted = ["config.json", "model.safetensors", "model-00001-of-00004.safetensors",
              "model.safetensors.index.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    unwanted = ["pytorch_model.bin", "consolidated.safetensors", "original/consolidated.00.pth",
                "model.gguf", "onnx/model.onnx", "flax_model.msgpack"]
    assert all(any(fnmatch.fnmatch(f, p) for p in ALLOW_PATTERNS) for f in wanted)
    assert not any(fnmatch.fnmatch(f, p) for f in unwanted for p in ALLOW_PATTERNS)


def test_train_with_a_cached_hub_id(default_base, hf_home, tmp_path, monkeypatch, capsys):
    """`jlora train --model org/name` end to end from the HF cache, offline; the adapter names the id."""
    import json

    from jlora.cli import main

    monkeypatch.chdir(tmp_path)
    _cache_snapshot(hf_home, "org/demo", default_base)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "completion": f"{i + 1}"}) + "\n" for i in range(8)))
    code = main(["train", "--model", "org/demo", "--data", str(data), "--out", str(tmp_path / "run"),
                 "--steps", "1", "--batch-size", "2", "--seq-len", "32", "--eval-every", "0", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/demo"


def test_cached_sharded_snapshot_with_blob_links_loads(checkpoint, hf_home, tmp_path, monkeypatch, rel):
    """The cache's files are symlinks into ../../blobs: shards must not count as outside the model dir."""
    monkeypatch.chdir(tmp_path)
    sharded = _sharded_copy(checkpoint("llama"), tmp_path / "sharded")
    snapshot = _cache_snapshot(hf_home, "org/sharded", sharded)
    assert (snapshot / "model-00001-of-00002.safetensors").is_symlink()
    ids = np.arange(12)[None]
    assert rel(jlora.load_hf("org/sharded")(ids), jlora.load_hf(checkpoint("llama"))(ids)) == 0
