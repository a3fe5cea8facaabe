"""`jlora ranks`: parameter counts equal PEFT's (tiny models) and the closed form r * (in + out) (presets)."""
import json

import jax
import numpy as np
import peft
import pytest
from flax import nnx

import jlora
from jlora.cli import main
from jlora.ranks.memory import activation_bytes
from jlora.ranks.params import base_parameter_count, lora_parameter_count, resolve_model, trainable_percent

TARGETS = {"qv": ["q_proj", "v_proj"], "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
           "all-linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def _closed_form(hf: dict, r: int, targets: list[str]) -> int:
    """r * (in + out) per projection, from the raw config.json fields."""
    h, i = hf["hidden_size"], hf["intermediate_size"]
    heads, kv = hf["num_attention_heads"], hf.get("num_key_value_heads") or hf["num_attention_heads"]
    d = hf.get("head_dim") or h // heads
    io = {"q_proj": (h, heads * d), "k_proj": (h, kv * d), "v_proj": (h, kv * d), "o_proj": (heads * d, h),
          "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    if hf["model_type"] == "phi3":  # one A per fused module: qkv_proj and gate_up_proj read x once
        io = {"qkv_proj": (h, (heads + 2 * kv) * d), "o_proj": (heads * d, h), "gate_up_proj": (h, 2 * i),
              "down_proj": (i, h)}
        targets = list(dict.fromkeys({"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                                      "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}.get(t, t)
                                     for t in targets))
    return r * hf["num_hidden_layers"] * sum(sum(io[t]) for t in targets)


@pytest.mark.parametrize("preset", sorted(jlora.PRESETS))
def test_presets_match_closed_form(preset):
    config, _ = resolve_model(preset)
    for name, targets in TARGETS.items():
        if config.fused_projections and name == "qv":  # q and v are parts of Phi-3's one qkv_proj
            with pytest.raises(ValueError, match="qkv_proj"):
                lora_parameter_count(config, 1, name)
            continue
        for r in (1, 16, 256):
            assert lora_parameter_count(config, r, name) == _closed_form(jlora.PRESETS[preset], r, targets)


def test_llama_31_8b_r16_all_linear():
    config, _ = resolve_model("llama-3.1-8b")
    assert lora_parameter_count(config, 16, "all-linear") == 41_943_040
    assert base_parameter_count(config) == 8_030_261_248


@pytest.mark.parametrize("spec", sorted(jlora.PRESETS) + ["llama", "llama-tied", "mistral", "qwen2"])
def test_base_count_equals_abstract_model(spec, checkpoint):
    config, _ = resolve_model(spec if spec in jlora.PRESETS else str(checkpoint(spec)))
    model = jlora.abstract_model(config, dtype="bfloat16")
    assert base_parameter_count(config) == sum(int(np.prod(x.shape))
                                               for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("family", ["llama", "llama-tied", "mistral", "qwen2"])
@pytest.mark.parametrize("targets", sorted(TARGETS))
def test_counts_equal_peft(family, targets, checkpoint, hf_model):
    path = checkpoint(family)
    config, _ = resolve_model(str(path))
    for r in (1, 8):
        ref = peft.get_peft_model(hf_model(path), peft.LoraConfig(r=r, target_modules=TARGETS[targets],
                                                                  task_type="CAUSAL_LM"))
        trainable, total = ref.get_nb_trainable_parameters()
        assert lora_parameter_count(config, r, targets) == trainable
        assert trainable_percent(config, trainable) == pytest.approx(100 * trainable / total, rel=1e-12)


def test_activation_estimate_properties():
    config = jlora.preset_config("llama-3.1-8b")
    a = activation_bytes(config, batch=8, seq=512, r=16)
    assert activation_bytes(config, batch=16, seq=512, r=16) == pytest.approx(2 * a)
    assert activation_bytes(config, batch=8, seq=512, r=16, remat=True) < a / 3
    assert activation_bytes(config, batch=8, seq=512, r=64) > a
    assert activation_bytes(config, batch=8, seq=512, r=16, dtype="float32") > a


def test_cli_table_and_advice(capsys):
    assert main(["ranks", "--model", "llama-3.1-8b"]) == 0
    out = capsys.readouterr().out
    assert "41,943,040" in out and "8,030,261,248" in out
    for want in ("targets qv", "targets attention", "targets all-linear", "ESTIMATE", "lora_alpha=r or 2r",
                 "use_rslora", "--max-lora-rank 64", "r=8 on q_proj, v_proj"):
        assert want in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("1 ", "256 "))]
    assert len(rows) == 6  # r=1 and r=256 in each of the three tables


def test_cli_json_quantize_and_dir(capsys, checkpoint):
    assert main(["ranks", "--model", str(checkpoint("llama")), "--json", "--seq-len", "16", "--batch-size", "2"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["r"] for r in rows} == {1, 2, 4, 8, 16, 32, 64, 128, 256}
    assert {r["targets"] for r in rows} == set(TARGETS)
    assert main(["ranks", "--model", "llama-3-70b", "--quantize", "nf4"]) == 0
    out = capsys.readouterr().out
    assert "NF4" in out and "r=64-128" in out


def test_cli_unknown_model(capsys):
    assert main(["ranks", "--model", "llama-9"]) == 2
    assert "llama-3.1-8b" in capsys.readouterr().err
