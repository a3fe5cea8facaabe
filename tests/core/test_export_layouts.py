"""A merged export replaces its directory as a whole: one layout, one model, never a mix (issue 16 item 1).

Loaders prefer `model.safetensors` over a sharded index, so a sharded export written beside an older
single file used to load the older model, in jlora and in transformers alike.
"""
import numpy as np
import pytest
import torch
from flax import nnx

import jlora
import jlora.convert.merged as merged

IDS = np.random.RandomState(0).randint(0, 96, (2, 10))
# A and B differ by rel > 1e-3; a loaded model is "B" when it is within 1% of that gap of B (float32
# rounding is ~1e-6 of the logits on any CPU), so the bounds cannot flake and cannot confuse A with B.
GAP = 1e-2


def _model(path, seed):
    return jlora.get_peft_model(jlora.load_hf(path), jlora.LoraConfig(r=4, init_lora_weights=False),
                                rngs=nnx.Rngs(seed))


def _hf_logits(hf_model, path):
    with torch.no_grad():
        return hf_model(path)(torch.tensor(IDS)).logits.double().numpy()


def test_sharded_export_over_single_file_loads_the_new_model(checkpoint, hf_model, rel, tmp_path):
    path = checkpoint("llama")
    a, b = _model(path, 1), _model(path, 2)
    want_a, want_b = np.asarray(a(IDS), np.float64), np.asarray(b(IDS), np.float64)
    sep = rel(want_a, want_b)
    assert sep > 1e-3, "A and B must differ, or this test proves nothing"
    out = tmp_path / "merged"
    jlora.save_merged(a, out)
    assert (out / "model.safetensors").exists()
    jlora.save_merged(b, out, shard_bytes=20_000)
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" not in names and "model.safetensors.index.json" in names, names
    assert rel(jlora.load_hf(out)(IDS), want_b) <= GAP * sep
    assert rel(_hf_logits(hf_model, out), want_b) <= GAP * sep
    # and back: single file over shards leaves no shard behind
    jlora.save_merged(a, out)
    assert not any(n.startswith("model-") or n.endswith(".index.json") for n in (p.name for p in out.iterdir()))
    assert rel(_hf_logits(hf_model, out), want_a) <= GAP * sep
    assert not [p for p in tmp_path.iterdir() if p.name != "merged"], "temporary siblings left behind"


def test_failure_mid_write_leaves_the_previous_export(checkpoint, hf_model, rel, tmp_path, monkeypatch):
    path = checkpoint("llama")
    a, b = _model(path, 1), _model(path, 2)
    want_a = np.asarray(a(IDS), np.float64)
    sep = rel(want_a, np.asarray(b(IDS), np.float64))
    assert sep > 1e-3, "A and B must differ, or this test proves nothing"
    out = tmp_path / "merged"
    jlora.save_merged(a, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []

    def failing_write(path, tensors, metadata=None):  # the second shard's write fails (disk full, crash)
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_write(path, tensors, metadata)

    real_write = merged.write_atomic
    monkeypatch.setattr(merged, "write_atomic", failing_write)
    with pytest.raises(OSError, match="No space"):
        jlora.save_merged(b, out, shard_bytes=20_000)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name != "merged"], "temporary siblings left behind"
    assert rel(jlora.load_hf(out)(IDS), want_a) <= GAP * sep
    assert rel(_hf_logits(hf_model, out), want_a) <= GAP * sep


def test_refuses_to_replace_a_directory_with_other_files(checkpoint, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"notes\.txt.*not part of a checkpoint"):
        jlora.save_merged(_model(checkpoint("llama"), 1), out)
    assert (out / "notes.txt").read_text() == "not a checkpoint" and len(list(out.iterdir())) == 1


@pytest.mark.parametrize("sentencepiece", ["tokenizer.model", "spiece.model"])
def test_merged_export_carries_every_tokenizer_file_of_its_base(checkpoint, tmp_path, sentencepiece):
    """What the Hub download fetches (chat_template.json, a SentencePiece model under either name) is copied into
    the merged export, and a previous export holding them is replaced without complaint."""
    import shutil

    from jlora.convert.model_dir import open_model_dir
    base = shutil.copytree(checkpoint("llama"), tmp_path / "base")
    side = {"chat_template.json": '{"chat_template": "{{ messages }}"}', sentencepiece: "spm bytes",
            "tokenizer_config.json": "{}", "generation_config.json": "{}"}
    for name, text in side.items():
        (base / name).write_text(text)
    assert open_model_dir(base) == base  # the SentencePiece file alone counts as a tokenizer
    out = tmp_path / "merged"
    for _ in range(2):
        jlora.save_merged(_model(base, 1), out)
        assert {name: (out / name).read_text() for name in side} == side
