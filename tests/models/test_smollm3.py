"""SmolLM3 (`SmolLM3ForCausalLM`) and SmolLM2 (a `LlamaForCausalLM`) against transformers, PEFT and bitsandbytes.

SmolLM3 is Llama with layers that skip rope: `no_rope_layers[i] == 1` means layer i rotates q and k,
0 means it does not (default: every `no_rope_layer_interval`-th layer, i.e. (i + 1) % 4 == 0, is NoPE).
With `use_sliding_window` and a `sliding_window`, the NoPE layers (`layer_types` "sliding_attention")
attend to the last `sliding_window` keys. Module names are Llama's, so PEFT and vLLM targets are too.
"""
import json

import numpy as np
import peft
import pytest
import torch
from flax import nnx

import jlora
from tests.hf_checkpoints import built_once, save_random_model
from tests.peft_checks import (jlora_adapter_loads_in_peft, lm_batch, lora_grads_equal_peft,
                               merged_export_loads_in_transformers, peft_adapter_loads_in_jlora)

VOCAB = 96
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, rope_theta=10000.0)
VARIANTS = {
    "nope": dict(no_rope_layers=[1, 0, 1, 0]),
    # the NoPE layers also slide over 8 keys; biases on the projections; untied head
    "window": dict(no_rope_layer_interval=2, use_sliding_window=True, sliding_window=8, attention_bias=True,
                   mlp_bias=True, tie_word_embeddings=False),
}


def make_smollm3(out_dir, *, seed=0, **extra):
    import transformers
    return save_random_model(transformers.SmolLM3Config(**{**TINY, **extra}), out_dir, seed=seed, bias_std=0.1)


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    get = built_once(tmp_path_factory, lambda variant, out: make_smollm3(out, **VARIANTS[variant]), "smollm3")
    return lambda variant="nope": get(variant)


def _ids(t=24, seed=3):
    return np.random.RandomState(seed).randint(0, VOCAB, (2, t))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_equal_transformers(variant, smol, hf_model, close32, logits32_and_64):
    path = smol(variant)
    want, want64 = logits32_and_64(hf_model(path), _ids())
    got = np.asarray(jlora.load_hf(path)(_ids()))
    close32(got, want, want64, what=variant)


def test_nope_layers_matter(smol, rel, tmp_path):
    """Guard: the same weights with every layer rotating give other logits (transformers), so the test
    above checks which layers skip rope; jlora reads the per-layer choice from config.json."""
    import transformers
    path = smol("nope")
    config = json.loads((path / "config.json").read_text())
    ref = transformers.SmolLM3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref.config.no_rope_layers = [1, 1, 1, 1]
    for layer in ref.model.layers:
        layer.self_attn.use_rope = 1
    with torch.no_grad():
        all_rope = ref(torch.tensor(_ids())).logits.numpy()
    assert rel(np.asarray(jlora.load_hf(path)(_ids())), all_rope) > 1e-3
    specs = jlora.load_hf(path).config.layer_specs
    assert [s.rope for s in specs] == ["global", "none", "global", "none"] == \
        ["global" if r else "none" for r in config["no_rope_layers"]]


@pytest.mark.parametrize("variant,kwargs", [
    pytest.param("nope", dict(r=8, lora_alpha=16, use_rslora=True, rank_pattern={"down_proj": 4, "layers.3.self_attn.q_proj": 2},
                  alpha_pattern={"v_proj": 32})),
    pytest.param("window", dict(r=4, lora_alpha=8), marks=pytest.mark.slow),  # biases + windows: covered below too
])
def test_jlora_export_loads_in_peft(variant, kwargs, smol, tmp_path):
    jlora_adapter_loads_in_peft(smol(variant), kwargs, _ids(), tmp_path / "adapter", max_lora_rank=8,
                                what=f"{variant} {kwargs}")


def test_peft_saved_adapter_loads_in_jlora(smol, tmp_path):
    pcfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"],
                           use_rslora=True, rank_pattern={"k_proj": 2}, init_lora_weights=False, task_type="CAUSAL_LM")
    peft_adapter_loads_in_jlora(smol("window"), pcfg, _ids(), tmp_path / "peft")


@pytest.mark.slow  # the merged path names nothing SmolLM3-specific; test_phi3 and tests/core run it by default
def test_merged_export_loads_in_transformers(smol, tmp_path):
    merged_export_loads_in_transformers(smol("nope"), dict(r=4), _ids(), tmp_path / "merged")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lora_gradients_equal_peft(variant, smol, tmp_path):
    """The training gradient through the NoPE layers (and the sliding ones, biases, untied head), on the
    default custom-VJP path, equals torch autograd through PEFT on transformers."""
    path = smol(variant)
    model = jlora.get_peft_model(jlora.load_hf(path), jlora.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False),
                                 rngs=nnx.Rngs(3))
    lora_grads_equal_peft(model, path, lm_batch(_ids(seed=8), VOCAB), tmp_path / "a", n_grads=4 * 7 * 2)


@pytest.mark.slow  # nothing SmolLM3-specific in the NF4 path (Llama's names); tests/qlora and test_phi3 cover it
def test_nf4_equals_transformers_bitsandbytes(smol, rel, tmp_path):
    import bitsandbytes as bnb
    import transformers
    path = smol("nope")  # hidden 64, intermediate 64: whole 64-blocks per row
    qcfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=torch.float32,
                                                            quantization_config=qcfg).eval()
    for m in ref.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False  # bitsandbytes' exact path (tests/qlora/conftest.py)
    with torch.no_grad():
        want = ref(torch.tensor(_ids())).logits.numpy()
    assert rel(np.asarray(jlora.load_hf(path, quantize="nf4")(_ids())), want) <= 1e-4


# -- presets ------------------------------------------------------------------------------------------

PUBLISHED = {"smollm3-3b": 3_075_098_624, "smollm2-1.7b": 1_711_376_384}


def transformers_meta_count(hf: dict) -> int:
    import transformers
    config = transformers.AutoConfig.for_model(**{k: v for k, v in hf.items() if k != "architectures"})
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_count(name):
    import jax
    config = jlora.preset_config(name)
    model = jlora.abstract_model(config, dtype="bfloat16")
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert total == transformers_meta_count(config.hf_config) == PUBLISHED[name]


def test_smollm3_preset_skips_rope_every_fourth_layer():
    specs = jlora.preset_config("smollm3-3b").layer_specs
    assert [i for i, s in enumerate(specs) if s.rope == "none"] == list(range(3, 36, 4))


@pytest.mark.parametrize("change,field", [
    ({"no_rope_layers": [1, 0]}, "no_rope_layers"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}}, "rope_type"),
    ({"layer_types": ["full_attention"] * 3 + ["chunked_attention"]}, "layer_types"),
])
def test_unsupported_config_names_field(change, field):
    import transformers
    hf = transformers.SmolLM3Config(**TINY).to_dict()
    hf.update(architectures=["SmolLM3ForCausalLM"], **change)
    with pytest.raises(jlora.models.ConfigError, match=field):
        jlora.models.ModelConfig.from_hf_dict(hf)
