"""inspect and export on adapters PEFT (and Unsloth, through PEFT's format) wrote; PEFT is the reference."""
import json

import numpy as np
import peft
import pytest
import torch
from safetensors.numpy import load_file, save_file

from jlora.cli import main
from jlora.ranks.adapter import read_adapter
from jlora.vllm_rules import check_vllm_adapter

IDS = np.random.RandomState(5).randint(0, 96, (2, 12))


def _peft(path, out, hf_model, **kw):
    """A PEFT adapter with random, non-zero B saved to `out`; returns the PeftModel."""
    torch.manual_seed(0)
    ref = peft.get_peft_model(hf_model(path), peft.LoraConfig(task_type="CAUSAL_LM", **{"init_lora_weights": False,
                                                                                         **kw})).eval()
    ref.save_pretrained(out)
    return ref


def _peft_deltas(ref) -> dict[str, np.ndarray]:
    """HF module name -> PEFT's own delta W (get_delta_weight), float64."""
    out = {}
    for name, mod in ref.named_modules():
        if isinstance(mod, peft.tuners.lora.LoraLayer) and "default" in getattr(mod, "lora_A", {}):
            with torch.no_grad():
                out[name.removeprefix("base_model.model.")] = mod.get_delta_weight("default").double().numpy()
    return out


def _logits(ref, ids=IDS):
    with torch.no_grad():
        return ref(torch.tensor(ids)).logits.double().numpy()


PATTERNS = dict(r=8, lora_alpha=16, use_rslora=True, rank_pattern={"down_proj": 2, "layers.1.self_attn.q_proj": 4},
                alpha_pattern={"v_proj": 3}, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"])


def _snapshot(d):
    """Every file under `d` with its bytes and mtime: equal snapshots mean nothing was written there."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.rglob("*"))}


def test_inspect_matches_peft_delta_weights(checkpoint, hf_model, tmp_path, capsys, monkeypatch):
    ref = _peft(checkpoint("llama"), tmp_path / "a", hf_model, **PATTERNS)
    before = _snapshot(tmp_path / "a")
    deltas = _peft_deltas(ref)
    assert main(["inspect", str(tmp_path / "a"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["module"] for r in rows} == set(deltas) and len(rows) == 14
    for row in rows:
        want = np.linalg.svd(deltas[row["module"]], compute_uv=False)[:row["r"]]
        assert {"module", "r", "norm", "effective_rank_90", "effective_rank_99"} <= set(row)
        np.testing.assert_allclose(row["singular_values"], want, rtol=1e-5, atol=1e-6 * want[0])
        assert row["norm"] == pytest.approx(np.linalg.norm(deltas[row["module"]]), rel=1e-5)
        assert 1 <= row["effective_rank_90"] <= row["effective_rank_99"] <= row["r"]
    assert {r["r"] for r in rows if r["kind"] == "down_proj"} == {2}
    assert _snapshot(tmp_path / "a") == before  # --json writes nothing

    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    assert main(["inspect", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "median effective rank" in out and "least used first" in out and "not analysed" not in out
    assert (tmp_path / "cwd" / "effective_rank.png").stat().st_size > 5_000  # default: the current directory
    assert main(["inspect", str(tmp_path / "a"), "--out", str(tmp_path / "plots")]) == 0
    assert f"heat map: {tmp_path / 'plots' / 'effective_rank.png'}" in capsys.readouterr().out
    assert (tmp_path / "plots" / "effective_rank.png").stat().st_size > 5_000
    assert _snapshot(tmp_path / "a") == before  # the adapter dir it read is never written


def test_inspect_names_what_it_does_not_analyse(checkpoint, hf_model, tmp_path, capsys, monkeypatch):
    """DoRA magnitudes and modules_to_save weights are named, one line each, not dropped silently."""
    monkeypatch.chdir(tmp_path)
    _peft(checkpoint("llama"), tmp_path / "a", hf_model, r=4, use_dora=True, target_modules=["q_proj", "v_proj"],
          modules_to_save=["lm_head"])
    assert main(["inspect", str(tmp_path / "a")]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("not analysed")]
    assert len(lines) == 2, lines
    assert "DoRA magnitude vectors" in lines[0] and "lora_magnitude_vector" in lines[0] and "(4 in all)" in lines[0]
    assert "modules_to_save" in lines[1] and "lm_head.weight" in lines[1]
    assert main(["inspect", str(tmp_path / "a"), "--json"]) == 0
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)) == 4  # stdout stays JSON; the notes go to stderr
    assert sum(x.startswith("not analysed") for x in captured.err.splitlines()) == 2


def test_inspect_flags_untrained_modules(checkpoint, hf_model, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _peft(checkpoint("llama"), tmp_path / "a", hf_model, r=4, init_lora_weights=True, target_modules=["q_proj"])
    assert main(["inspect", str(tmp_path / "a")]) == 0
    assert "zero update" in capsys.readouterr().out


def test_export_folds_patterns_and_peft_serves_it_identically(checkpoint, hf_model, rel, tmp_path, capsys):
    path = checkpoint("llama")
    ref = _peft(path, tmp_path / "a", hf_model, **PATTERNS)
    want = _logits(ref)
    assert main(["export", str(tmp_path / "a"), "--out", str(tmp_path / "e"), "--max-lora-rank", "8",
                 "--no-drift"]) == 0
    out = capsys.readouterr().out
    assert "folded the per-module scale" in out and "vLLM check passed" in out
    cfg = json.loads((tmp_path / "e" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {} and cfg["r"] == 8
    check_vllm_adapter(tmp_path / "e", max_lora_rank=8)
    exported = peft.PeftModel.from_pretrained(hf_model(path), tmp_path / "e").eval()
    assert rel(_logits(exported), want) <= 1e-5


def test_truncation_matches_float64_svd_of_peft_deltas(checkpoint, hf_model, rel, tmp_path, capsys):
    path = checkpoint("llama")
    ref = _peft(path, tmp_path / "a", hf_model, r=16, lora_alpha=32, rank_pattern={"down_proj": 4},
                target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    deltas = _peft_deltas(ref)
    assert main(["export", str(tmp_path / "a"), "--out", str(tmp_path / "e"), "--base", str(path),
                 "--max-lora-rank", "8"]) == 0
    capsys.readouterr()
    got = read_adapter(tmp_path / "e")
    assert {m.r for m in got.modules} == {8}
    report = {m["module"]: m for m in json.loads((tmp_path / "e" / "export_report.json").read_text())["modules"]}
    for m in got.modules:
        u, s, vt = np.linalg.svd(deltas[m.name])
        k = 4 if m.kind == "down_proj" else 8
        want = (u[:, :k] * s[:k]) @ vt[:k]
        np.testing.assert_allclose(m.delta(), want, atol=2e-6 * np.abs(want).max())
        kept = np.sum(s[:k] ** 2) / np.sum(s ** 2)
        assert report[m.name]["energy_kept"] == pytest.approx(kept, rel=1e-6)  # PEFT's delta is float32
        assert report[m.name]["truncated"] == (m.kind != "down_proj")
    # the drift jlora reports equals the drift PEFT shows on the same inputs
    ids = np.random.RandomState(0).randint(0, 96, (4, 32))
    exported = peft.PeftModel.from_pretrained(hf_model(path), tmp_path / "e").eval()
    drift = np.abs(_logits(exported, ids) - _logits(ref, ids)).max()
    assert json.loads((tmp_path / "e" / "export_report.json").read_text())["logit_drift"]["max_abs"] == \
        pytest.approx(drift, rel=1e-3)


def test_unsloth_style_adapter(checkpoint, hf_model, tmp_path, capsys, monkeypatch):
    """Unsloth saves through PEFT: extra config fields, a hub base name; here also bf16 and `.default.` keys."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # the hub base is looked up in an empty cache, offline
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _peft(checkpoint("llama"), tmp_path / "p", hf_model, r=16, lora_alpha=16, lora_dropout=0.0,
          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    src = tmp_path / "unsloth"
    src.mkdir()
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    cfg.update(base_model_name_or_path="unsloth/llama-3-8b-bnb-4bit", target_modules=["up_proj", "q_proj", "k_proj",
               "down_proj", "o_proj", "gate_proj", "v_proj"], loftq_config={}, layer_replication=None,
               use_qalora=False, auto_mapping=None)
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    import ml_dtypes
    tensors = load_file(tmp_path / "p" / "adapter_model.safetensors")
    save_file({k.replace(".weight", ".default.weight"): v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()},
              src / "adapter_model.safetensors", metadata={"format": "pt"})

    assert main(["inspect", str(src), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 14
    assert main(["export", str(src), "--out", str(tmp_path / "e")]) == 0
    check_vllm_adapter(tmp_path / "e", max_lora_rank=16)
    out = load_file(tmp_path / "e" / "adapter_model.safetensors")
    assert all(".default." not in k for k in out)
    for k, v in tensors.items():
        np.testing.assert_array_equal(out[k], v.astype(ml_dtypes.bfloat16).astype(np.float32))
    capsys.readouterr()
    assert main(["export", str(src), "--out", str(tmp_path / "m"), "--merge"]) == 2
    assert "--base" in capsys.readouterr().err


def test_violations_are_errors_that_name_the_rule(checkpoint, hf_model, tmp_path, capsys):
    path = checkpoint("llama")
    _peft(path, tmp_path / "dora", hf_model, r=4, use_dora=True, target_modules=["q_proj"])
    assert main(["export", str(tmp_path / "dora"), "--out", str(tmp_path / "e1")]) == 2
    err = capsys.readouterr().err
    assert "DoRA" in err and "lora_magnitude_vector" in err and not (tmp_path / "e1").exists()

    _peft(path, tmp_path / "r32", hf_model, r=32, target_modules=["q_proj"])
    assert main(["export", str(tmp_path / "r32"), "--out", str(tmp_path / "e2")]) == 2
    err = capsys.readouterr().err
    assert "start vLLM with --max-lora-rank 32" in err and not (tmp_path / "e2").exists()
    assert main(["export", str(tmp_path / "r32"), "--out", str(tmp_path / "e3"), "--max-lora-rank", "24"]) == 2
    assert "not one vLLM accepts" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "r32"), "--out", str(tmp_path / "r32")]) == 2
    assert "source adapter dir" in capsys.readouterr().err


def test_embedding_adapter(checkpoint, hf_model, rel, tmp_path, capsys):
    """LoRA on embed_tokens (lora_embedding_A/B) exports too; PEFT's saved full embedding is named as a violation."""
    path = checkpoint("llama")
    kw = dict(r=8, lora_alpha=16, target_modules=["embed_tokens", "q_proj"], rank_pattern={"embed_tokens": 4})
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        ref = _peft(path, tmp_path / "full", hf_model, **kw)
    assert main(["export", str(tmp_path / "full"), "--out", str(tmp_path / "e1")]) == 2
    assert "save_embedding_layers" in capsys.readouterr().err
    ref.save_pretrained(tmp_path / "a", save_embedding_layers=False)
    assert main(["export", str(tmp_path / "a"), "--out", str(tmp_path / "e2"), "--no-drift"]) == 0
    cfg = json.loads((tmp_path / "e2" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["q_proj", "embed_tokens"]
    check_vllm_adapter(tmp_path / "e2", max_lora_rank=16)
    exported = peft.PeftModel.from_pretrained(hf_model(path), tmp_path / "e2").eval()
    assert rel(_logits(exported), _logits(ref)) <= 1e-6


@pytest.mark.parametrize("key,want", [
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "model.layers.0.self_attn.q_proj.lora_A.weight"),
    ("base_model.model.model.layers.0.mlp.up_proj.lora_B.default.weight", "model.layers.0.mlp.up_proj.lora_B.weight"),
    ("base_model.model.model.embed_tokens.lora_embedding_A.default", "model.embed_tokens.lora_embedding_A"),
    ("base_model.model.model.embed_tokens.lora_embedding_B", "model.embed_tokens.lora_embedding_B"),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
     "model.layers.0.self_attn.q_proj.lora_magnitude_vector"),
    ("base_model.model.model.default_proj.lora_A.weight", "model.default_proj.lora_A.weight"),
])
def test_one_key_normaliser_for_loading_and_inspecting(key, want):
    import jlora.convert.peft_adapter as convert_side
    import jlora.ranks.adapter as ranks_side
    assert convert_side.normalise_key(key) == want
    assert ranks_side.normalise_key is convert_side.normalise_key  # one source, so the two cannot drift apart


def test_adapter_name_in_keys_loads_and_inspects_alike(checkpoint, hf_model, tmp_path):
    """Keys saved with PEFT's in-memory adapter name (`.default.`) load into jlora and read in inspect alike."""
    import jlora
    path = checkpoint("llama")
    _peft(path, tmp_path / "p", hf_model, r=4, target_modules=["q_proj", "down_proj"])
    tensors = load_file(tmp_path / "p" / "adapter_model.safetensors")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text((tmp_path / "p" / "adapter_config.json").read_text())
    save_file({k.replace(".weight", ".default.weight"): v for k, v in tensors.items()},
              tmp_path / "a" / "adapter_model.safetensors", metadata={"format": "pt"})
    model = jlora.load_adapter(jlora.load_hf(path), tmp_path / "a")
    got = {n: m for n, m in jlora.peft_model.adapted_modules(model)}
    factors = read_adapter(tmp_path / "a").by_name()
    assert set(got) == set(factors) and len(got) == 4
    for name, m in got.items():
        np.testing.assert_array_equal(np.asarray(m.lora.a[...]).T, tensors[f"base_model.model.{name}.lora_A.weight"])
        np.testing.assert_array_equal(factors[name].b, tensors[f"base_model.model.{name}.lora_B.weight"])
