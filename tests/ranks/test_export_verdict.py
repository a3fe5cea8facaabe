"""`jlora export`: refusals that leave --out as it was, and the verdict checked against a float64 reference.

Issue 16 items 3 (export part), 4 (export part), 14 and 21. The reference: PEFT writes the adapter; its
factors are read back in float64, cut by numpy's SVD and merged into transformers' model in float64.
"""
import json

import numpy as np
import peft
import pytest
import torch
from safetensors.numpy import load_file, save_file

from jlora.cli import main

IDS = np.random.RandomState(0).randint(0, 96, (4, 32))  # the sequences jlora.ranks.drift.DriftProbe uses
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def offline_hub(tmp_path, monkeypatch):
    """An empty HF cache, offline: the adapters below that name `meta-llama/x` are looked up there, never online."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def adapter(checkpoint, tmp_path_factory):
    """A rank-16 PEFT adapter (random, non-zero B) on the tiny Llama, base_model_name_or_path = that checkpoint."""
    import transformers
    path = checkpoint("llama")
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    ref = peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32,
                                                    init_lora_weights=False, target_modules=TARGETS))
    out = tmp_path_factory.mktemp("adapter")
    ref.save_pretrained(out)
    # a decaying spectrum (column j of B scaled by 0.4^j), so that cuts lose little at rank 8 and much at rank 1
    t = load_file(str(out / "adapter_model.safetensors"))
    decay = (0.4 ** np.arange(16)).astype(np.float32)
    t = {k: v * decay if ".lora_B." in k else v for k, v in t.items()}
    save_file(t, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(path)
    return out


def _deltas(adapter_dir) -> dict[str, np.ndarray]:
    """HF module name -> scale * B @ A in float64, from the file PEFT wrote."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    t = load_file(str(adapter_dir / "adapter_model.safetensors"))
    scale = cfg["lora_alpha"] / cfg["r"]
    out = {}
    for k in t:
        if k.endswith("lora_A.weight"):
            name = k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = t[k.replace("lora_A", "lora_B")].astype(np.float64)
            out[name] = scale * b @ t[k].astype(np.float64)
    return out


def _cut(delta, k):
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vt[:k], float(np.sum(s[:k] ** 2) / np.sum(s ** 2))


def _logits64(hf_model, path, deltas) -> np.ndarray:
    """transformers' logits in float64 with W + delta merged into each named projection."""
    model = hf_model(path).double()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, d in deltas.items():
            params[f"{name}.weight"].add_(torch.from_numpy(d))
        return model(torch.tensor(IDS)).logits.numpy()


def _ref_drift(hf_model, path, deltas, k) -> float:
    original = _logits64(hf_model, path, deltas)
    cut = _logits64(hf_model, path, {n: _cut(d, k)[0] for n, d in deltas.items()})
    return float(np.abs(cut - original).max() / np.abs(original).max())


def _report(out):
    return json.loads((out / "export_report.json").read_text())


def test_verdict_matches_float64_reference(checkpoint, hf_model, adapter, tmp_path, capsys):
    path = checkpoint("llama")
    deltas = _deltas(adapter)
    d1, d8 = _ref_drift(hf_model, path, deltas, 1), _ref_drift(hf_model, path, deltas, 8)
    assert d8 < d1 / 3, (d1, d8)
    threshold = (d1 * d8) ** 0.5  # strictly between the two: rank 1 fails, rank 8 passes
    pct = str(threshold * 100)

    assert main(["export", str(adapter), "--out", str(tmp_path / "e1"), "--max-lora-rank", "1",
                 "--max-drift", pct]) == 0
    out = capsys.readouterr().out
    v = _report(tmp_path / "e1")["verdict"]
    drift = _report(tmp_path / "e1")["logit_drift"]["relative"]
    assert drift == pytest.approx(d1, rel=1e-3)
    assert v["acceptable"] is False and "NOT acceptable" in out and "not acceptable" in out
    assert v["recommended_max_lora_rank"] == 8 and v["recommended_relative_drift"] == pytest.approx(d8, rel=1e-2)
    assert "smallest --max-lora-rank within" in out
    lost = {n: 1 - _cut(d, 1)[1] for n, d in deltas.items()}
    want = sorted(lost, key=lost.get, reverse=True)[:5]
    assert [m["module"] for m in v["most_energy_lost"]] == want
    for m in v["most_energy_lost"]:
        assert m["energy_lost"] == pytest.approx(lost[m["module"]], rel=1e-5)
    assert v["other_cut_modules"] == len(deltas) - 5 and f"the other {len(deltas) - 5} cut modules lost less" in out

    assert main(["export", str(adapter), "--out", str(tmp_path / "e8"), "--max-lora-rank", "8",
                 "--max-drift", pct]) == 0
    v = _report(tmp_path / "e8")["verdict"]
    assert v["acceptable"] is True and _report(tmp_path / "e8")["logit_drift"]["relative"] == pytest.approx(d8, rel=1e-2)
    assert "verdict: acceptable" in capsys.readouterr().out


def test_rank_that_fits_is_acceptable_with_zero_drift(checkpoint, adapter, tmp_path, capsys):
    assert main(["export", str(adapter), "--out", str(tmp_path / "e"), "--max-lora-rank", "16"]) == 0
    out = capsys.readouterr().out
    v = _report(tmp_path / "e")["verdict"]
    assert v["acceptable"] is True and v["most_energy_lost"] == [] and "verdict: acceptable" in out
    assert "logit_drift" not in _report(tmp_path / "e")  # nothing changed: nothing to measure
    assert v["threshold"] == 0.01  # the documented default


def test_nan_weights_are_an_error_naming_the_module(adapter, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    t = load_file(str(adapter / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    t[key][3, 2] = np.nan
    save_file(t, str(bad / "adapter_model.safetensors"), metadata={"format": "pt"})
    assert main(["export", str(bad), "--out", str(tmp_path / "e"), "--no-drift"]) == 2
    err = capsys.readouterr().err
    assert key in err and "1 non-finite" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "e").exists()


def test_wrong_base_is_an_error_and_leaves_out_as_it_was(checkpoint, adapter, tmp_path, capsys):
    qwen2, mistral = checkpoint("qwen2"), checkpoint("mistral")  # built first: transformers prints to stderr
    out = tmp_path / "e"
    assert main(["export", str(adapter), "--out", str(out), "--max-lora-rank", "8"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    # another architecture than the local base the adapter names
    assert main(["export", str(adapter), "--out", str(out), "--max-lora-rank", "1", "--base", str(qwen2)]) == 2
    err = capsys.readouterr().err
    assert "model_type: 'llama' vs 'qwen2'" in err and "nothing written" in err
    assert main(["export", str(adapter), "--out", str(out), "--no-drift", "--merge", "--base", str(qwen2)]) == 2
    assert "model_type: 'llama' vs 'qwen2'" in capsys.readouterr().err  # --merge checks the base too
    # a hub id in the config (nothing local to compare), a base whose projections have other shapes
    hub = tmp_path / "hub"
    hub.mkdir()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (hub / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "meta-llama/x"}))
    (hub / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    assert main(["export", str(hub), "--out", str(out), "--max-lora-rank", "1", "--base", str(mistral)]) == 2
    err = capsys.readouterr().err
    assert "q_proj" in err and "[64, 32]" in err and "another base" in err and len(err.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_out_must_be_new_empty_or_a_previous_export(adapter, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["export", str(adapter), "--out", str(mine), "--no-drift"]) == 2
    err = capsys.readouterr().err
    assert str(mine) in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert (mine / "notes.txt").read_text() == "keep me"
    # a previous export is replaced as a whole, without --overwrite
    out = tmp_path / "e"
    assert main(["export", str(adapter), "--out", str(out), "--no-drift", "--max-lora-rank", "1"]) == 0
    assert main(["export", str(adapter), "--out", str(out), "--no-drift"]) == 0
    assert _report(out)["max_lora_rank"] is None and json.loads((out / "adapter_config.json").read_text())["r"] == 16
    # --overwrite replaces anything, except a directory holding the source
    assert main(["export", str(adapter), "--out", str(mine), "--no-drift", "--overwrite"]) == 0
    assert not (mine / "notes.txt").exists() and (mine / "export_report.json").exists()
    assert main(["export", str(adapter), "--out", str(adapter.parent), "--no-drift", "--overwrite"]) == 2
    assert "contains the source adapter dir" in capsys.readouterr().err
    assert (adapter / "adapter_config.json").exists()


def test_failed_merge_leaves_the_previous_export(checkpoint, adapter, tmp_path, capsys, monkeypatch):
    out = tmp_path / "e"
    assert main(["export", str(adapter), "--out", str(out), "--merge"]) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert (out / "merged" / "model.safetensors").exists() and (out / "export_report.json").exists()
    import jlora.convert.merged as merged

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(merged, "write_atomic", full_disk)
    assert main(["export", str(adapter), "--out", str(out), "--merge", "--max-lora-rank", "8"]) == 2
    err = capsys.readouterr().err
    assert "No space left" in err and "nothing written" in err
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["e"]


def test_same_architecture_other_weights_is_an_error_but_a_bf16_copy_is_not(checkpoint, adapter, tmp_path, capsys):
    import transformers
    path = checkpoint("llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    with torch.no_grad():  # a "tune" of the same architecture: every weight moved by about 5%
        for p in model.parameters():
            p.mul_(1 + 0.05 * torch.randn_like(p))
    model.to(torch.float32).save_pretrained(tmp_path / "tuned")
    capsys.readouterr()
    assert main(["export", str(adapter), "--out", str(tmp_path / "e"), "--max-lora-rank", "8", "--base",
                 str(tmp_path / "tuned")]) == 2
    err = capsys.readouterr().err
    assert "is not the base" in err and "model.embed_tokens.weight differs" in err and f"--base {path}" in err
    assert not (tmp_path / "e").exists()
    assert main(["export", str(adapter), "--out", str(tmp_path / "e"), "--max-lora-rank", "8", "--base",
                 str(tmp_path / "bf16")]) == 0


def test_cut_without_a_base_has_an_unknown_verdict(adapter, tmp_path, capsys):
    hub = tmp_path / "hub"
    hub.mkdir()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (hub / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "meta-llama/x"}))
    (hub / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    assert main(["export", str(hub), "--out", str(tmp_path / "e"), "--max-lora-rank", "8"]) == 0
    out = capsys.readouterr().out
    v = _report(tmp_path / "e")["verdict"]
    assert v["acceptable"] is None and "verdict: unknown" in out and "pass --base DIR" in out
    assert "recommended_max_lora_rank" not in v and len(v["most_energy_lost"]) == 5


def test_merge_keeps_the_base_dtype(adapter, checkpoint, tmp_path, capsys):
    """A bf16 base merges into a bf16 checkpoint (config torch_dtype too), W + delta W within one bf16 rounding of
    the float64 sum; --dtype float32 overrides."""
    import transformers
    from safetensors.torch import load_file as load_torch
    base = transformers.AutoModelForCausalLM.from_pretrained(checkpoint("llama"), dtype=torch.float32)
    base.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text()).get("torch_dtype", "bfloat16") == "bfloat16"
    assert main(["export", str(adapter), "--out", str(tmp_path / "e"), "--merge", "--base", str(tmp_path / "bf16"),
                 "--no-drift"]) == 0, capsys.readouterr().err
    merged = tmp_path / "e" / "merged"
    config = json.loads((merged / "config.json").read_text())
    assert config.get("torch_dtype", config.get("dtype")) == "bfloat16"
    tensors = load_torch(str(merged / "model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    w = load_torch(str(tmp_path / "bf16" / "model.safetensors"))
    for name, delta in _deltas(adapter).items():
        want = w[name + ".weight"].double().numpy() + delta
        got = tensors[name + ".weight"].double().numpy()
        assert np.all(np.abs(got - want) <= 2.0 ** -8 * np.abs(want) + 1e-30), name
    assert main(["export", str(adapter), "--out", str(tmp_path / "f"), "--merge", "--base", str(tmp_path / "bf16"),
                 "--no-drift", "--dtype", "float32"]) == 0
    assert {t.dtype for t in load_torch(str(tmp_path / "f" / "merged" / "model.safetensors")).values()} == {torch.float32}
