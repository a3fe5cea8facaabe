"""The family registry: one table (model_type -> Family) read by load_hf, the converters, the presets and
the planner; bad configs are refused naming the field and the value."""
import json

import pytest

import jlora
from jlora.models import FAMILIES, ConfigError, LayerSpec, ModelConfig
from jlora.models.registry import SUPPORTED_ARCHITECTURES, family_for

QWEN3 = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=64, hidden_size=32,
             intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def test_unknown_architecture_lists_every_model_type():
    with pytest.raises(ConfigError, match=r"GPT2LMHeadModel.*not a model family") as e:
        ModelConfig.from_hf_dict({**QWEN3, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, where="x.json")
    for model_type in FAMILIES:
        assert model_type in str(e.value)
    assert str(e.value).startswith("x.json: ")


def test_model_type_alone_selects_the_family():
    assert family_for({"model_type": "qwen3"}).model_type == "qwen3"
    assert all(SUPPORTED_ARCHITECTURES[a] == f.model_type for f in FAMILIES.values() for a in f.architectures)


@pytest.mark.parametrize("d,field,value", [
    ({**QWEN3, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type", "'yarn'"),
    ({**QWEN3, "rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e6}}, "rope_parameters.rope_type",
     "'dynamic'"),
    ({**QWEN3, "architectures": ["LlamaForCausalLM"], "rope_scaling": {"type": "longrope"}},
     "rope_scaling.rope_type", "'longrope'"),
    ({**QWEN3, "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True}, "use_sliding_window", "True"),
    ({**QWEN3, "hidden_act": "relu"}, "hidden_act", "'relu'"),
    ({**QWEN3, "layer_types": ["full_attention", "chunked_attention", "full_attention", "full_attention"]},
     "layer_types[1]", "'chunked_attention'"),
])
def test_unsupported_field_value_is_named(d, field, value):
    with pytest.raises(ConfigError, match=rf"^cfg\.json: {field.replace('[', '.').replace(']', '.')}={value} "
                                           rf"is not supported; supported: "):
        ModelConfig.from_hf_dict(d, where="cfg.json")


def test_qwen3_sliding_layers_as_transformers_derives_them():
    """use_sliding_window + max_window_layers (no layer_types): layers at index >= max_window_layers slide."""
    c = ModelConfig.from_hf_dict({**QWEN3, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2})
    assert c.layer_specs == (LayerSpec(None),) * 2 + (LayerSpec(8),) * 2
    off = ModelConfig.from_hf_dict({**QWEN3, "use_sliding_window": False, "sliding_window": 8})
    assert off.layer_specs == (LayerSpec(None),) * 4 and off.sliding_window is None


def test_layer_pattern_and_replace_keep_the_specs():
    import dataclasses
    c = ModelConfig.from_hf_dict({**QWEN3, "layer_types": ["sliding_attention", "full_attention"] * 2,
                                  "use_sliding_window": True, "sliding_window": 8})
    assert c.layer_pattern == 2
    three = dataclasses.replace(c, num_hidden_layers=3)  # the planner traces 2-layer copies this way
    assert three.layer_specs == (LayerSpec(8), LayerSpec(None), LayerSpec(8))
    assert ModelConfig.from_hf_dict(QWEN3).layer_pattern == 1


def test_presets_come_from_the_families():
    """jlora.PRESETS is the union of the families' presets (tests/core/test_presets.py builds each one
    abstractly and compares its parameter count with transformers'); each family names at least one."""
    union = {name: d for f in FAMILIES.values() for name, d in f.presets.items()}
    assert jlora.PRESETS == union
    for f in FAMILIES.values():
        assert f.presets, f"family {f.model_type} has no preset"
        for name, d in f.presets.items():
            assert family_for(d, name).model_type == f.model_type, name
            assert json.loads(json.dumps(d)) == d, f"{name}: presets are config.json dicts"


def test_old_names_still_import():
    from jlora.llama import LlamaForCausalLM, Linear, use_kernels  # noqa: F401
    from jlora.llama_config import SUPPORTED_ARCHITECTURES as old, ConfigError as OldError, LlamaConfig
    from jlora.presets import PRESETS, preset_config  # noqa: F401
    from jlora.rope import inverse_frequencies  # noqa: F401
    assert LlamaConfig is ModelConfig and OldError is ConfigError and old is SUPPORTED_ARCHITECTURES
    assert jlora.LlamaForCausalLM is LlamaForCausalLM
