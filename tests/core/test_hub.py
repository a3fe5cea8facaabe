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
              "model.safetensors.index.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
              "spiece.model", "chat_template.json", "chat_template.jinja", "generation_config.json"]
    unwanted = ["pytorch_model.bin", "consolidated.safetensors", "original/consolidated.00.pth",
                "model.gguf", "onnx/model.onnx", "flax_model.msgpack"]
    assert all(any(fnmatch.fnmatch(f, p) for p in ALLOW_PATTERNS) for f in wanted)
    assert not any(fnmatch.fnmatch(f, p) for f in unwanted for p in ALLOW_PATTERNS)


def test_cached_sharded_snapshot_with_blob_links_loads(checkpoint, hf_home, tmp_path, monkeypatch, rel):
    """The cache's files are symlinks into ../../blobs: shards must not count as outside the model dir."""
    monkeypatch.chdir(tmp_path)
    sharded = _sharded_copy(checkpoint("llama"), tmp_path / "sharded")
    snapshot = _cache_snapshot(hf_home, "org/sharded", sharded)
    assert (snapshot / "model-00001-of-00002.safetensors").is_symlink()
    ids = np.arange(12)[None]
    assert rel(jlora.load_hf("org/sharded")(ids), jlora.load_hf(checkpoint("llama"))(ids)) == 0


def test_a_path_that_reads_as_a_hub_id_resolves(checkpoint, hf_home, tmp_path, monkeypatch):
    """resolve_model(Path("org/tiny")) (what `load_hf(Path(...))` passes) is a Hub id when no such dir exists."""
    monkeypatch.chdir(tmp_path)
    snapshot = _cache_snapshot(hf_home, "org/tiny", checkpoint("llama"))
    assert resolve_model(Path("org/tiny")) == snapshot
    assert resolve_model(Path(f"org/tiny@{COMMIT}")) == snapshot


@pytest.mark.parametrize("model, revision", [("org/demo", None), (f"org/demo@{COMMIT}", COMMIT)])
def test_train_with_a_cached_hub_id(default_base, hf_home, tmp_path, monkeypatch, capsys, model, revision):
    """`jlora train --model org/name[@rev]` end to end from the HF cache, offline; the adapter names the id
    and PEFT's `revision` field keeps the @rev (PEFT loads the base at it)."""
    import json

    from jlora.cli import main

    monkeypatch.chdir(tmp_path)
    _cache_snapshot(hf_home, "org/demo", default_base)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "completion": f"{i + 1}"}) + "\n" for i in range(8)))
    code = main(["train", "--model", model, "--data", str(data), "--out", str(tmp_path / "run"),
                 "--steps", "1", "--batch-size", "2", "--seq-len", "32", "--eval-every", "0", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/demo" and config["revision"] == revision


def _peft_adapter(base_dir, out, named: str):
    """A rank-8 PEFT adapter with random non-zero B on `base_dir`, whose config names `named` as its base."""
    import json

    import peft
    import torch
    import transformers
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    ref = peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16,
                                                    init_lora_weights=False, target_modules=["q_proj", "v_proj"]))
    ref.save_pretrained(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": named}))
    return out


def test_export_of_a_hub_id_adapter_finds_its_base_in_the_cache(checkpoint, hf_home, tmp_path, monkeypatch, capsys):
    """An adapter trained from `org/tiny`: the drift check and --merge use the cached snapshot, `--base org/tiny`
    works, and another --base is compared with the cached one (the check is not skipped for Hub ids)."""
    import json

    from jlora.cli import main

    monkeypatch.chdir(tmp_path)
    qwen2 = checkpoint("qwen2")
    snapshot = _cache_snapshot(hf_home, "org/tiny", checkpoint("llama"))
    adapter = _peft_adapter(checkpoint("llama"), tmp_path / "adapter", "org/tiny")
    capsys.readouterr()
    assert main(["export", str(adapter), "--out", str(tmp_path / "e"), "--max-lora-rank", "1", "--merge"]) == 0, \
        capsys.readouterr().err
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "e" / "export_report.json").read_text())
    assert report["base"] == str(snapshot) and "logit_drift" in report and report["verdict"]["base_verified"] is True
    assert (tmp_path / "e" / "merged" / "model.safetensors").exists() and "vllm serve org/tiny " in out
    assert main(["export", str(adapter), "--out", str(tmp_path / "e2"), "--merge", "--base", "org/tiny"]) == 0
    assert json.loads((tmp_path / "e2" / "export_report.json").read_text())["base"] == str(snapshot)
    capsys.readouterr()
    assert main(["export", str(adapter), "--out", str(tmp_path / "e3"), "--no-drift", "--merge",
                 "--base", str(qwen2)]) == 2
    assert "model_type: 'llama' vs 'qwen2'" in capsys.readouterr().err


def test_export_with_an_unresolvable_hub_base_says_base_not_verified(checkpoint, hf_home, tmp_path, monkeypatch,
                                                                    capsys):
    import json

    from jlora.cli import main

    monkeypatch.chdir(tmp_path)
    adapter = _peft_adapter(checkpoint("llama"), tmp_path / "adapter", "org/absent")
    capsys.readouterr()
    assert main(["export", str(adapter), "--out", str(tmp_path / "e"), "--max-lora-rank", "1",
                 "--base", str(checkpoint("llama"))]) == 0
    out = capsys.readouterr().out
    v = json.loads((tmp_path / "e" / "export_report.json").read_text())["verdict"]
    assert v["base_verified"] is False and "base not verified" in v["reason"] and "'org/absent'" in v["reason"]
    assert "base not verified" in out
    assert main(["export", str(adapter), "--out", str(tmp_path / "e2"), "--merge"]) == 2
    err = capsys.readouterr().err
    assert "--merge needs the base model (base not verified" in err and "'org/absent'" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "e2").exists()


def test_unreachable_hub_without_offline_is_one_line_within_seconds(tmp_path):
    """The original failure: no HF_HUB_OFFLINE, no network (HF_ENDPOINT on a closed port), an empty cache.
    A subprocess, since huggingface_hub reads HF_ENDPOINT when it is imported."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_ENDPOINT="http://127.0.0.1:9")
    code = ("import time\nfrom jlora.convert.hub import resolve_model\nfrom jlora.convert.safetensors_io import "
            "CheckpointError\nt = time.perf_counter()\ntry:\n    resolve_model('org/absent')\n"
            "except CheckpointError as e:\n    print(f'{time.perf_counter() - t:.2f}'); print(e)\n")
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    lines = run.stdout.strip().splitlines()
    assert run.returncode == 0 and len(lines) == 2, run.stdout + run.stderr
    assert float(lines[0]) < 30, f"resolving took {lines[0]} s"
    assert "'org/absent'" in lines[1] and "could not be fetched" in lines[1] and "local checkpoint directory" in lines[1]
