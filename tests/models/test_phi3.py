"""Phi-3 / Phi-4 (`Phi3ForCausalLM`) against transformers, PEFT, bitsandbytes and vLLM's rules.

What differs from Llama and is checked here against the reference, never against jlora itself:
- fused `qkv_proj` (output rows q, then k, then v) and `gate_up_proj` (gate rows first; silu on gate);
- LoRA on the fused modules as PEFT names them (one A, one B per fused module), and vLLM's Phi3
  `packed_modules_mapping` (`qkv_proj -> [qkv_proj]`): split names are not modules of this model;
- `partial_rotary_factor` < 1 (Phi-4-mini): only the first dims of each head rotate;
- longrope: short factors while max(position) + 1 <= original_max_position_embeddings, long factors
  beyond, cos/sin scaled by sqrt(1 + ln(max/orig) / ln(orig)); a sliding window on every layer.
"""
import json

import numpy as np
import peft
import pytest
import torch
from flax import nnx

import jlora
from jlora.vllm_rules import vllm_violations
from tests.hf_checkpoints import built_once, save_random_model
from tests.peft_checks import (jlora_adapter_loads_in_peft, lm_batch, lora_grads_equal_peft,
                               merged_export_loads_in_transformers, peft_adapter_loads_in_jlora)

VOCAB = 96
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)
VARIANTS = {
    # every layer slides over 8 keys (Phi-3-mini-4k has sliding_window 2047)
    "window": dict(sliding_window=8),
    # Phi-4-mini's shape: rotary on half of each head, longrope, tied embeddings
    "longrope": dict(partial_rotary_factor=0.5, original_max_position_embeddings=16, tie_word_embeddings=True,
                     rope_scaling=dict(rope_type="longrope", short_factor=[1.0, 1.3, 1.9, 2.6],
                                       long_factor=[1.5, 3.0, 7.0, 11.0])),
}
FUSED = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def make_phi3(out_dir, *, seed=0, sizes=TINY, **extra):
    """A random transformers Phi3ForCausalLM (non-trivial norms) saved with save_pretrained."""
    import transformers
    return save_random_model(transformers.Phi3Config(**{**sizes, **extra}), out_dir, seed=seed)


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    get = built_once(tmp_path_factory, lambda variant, out: make_phi3(out, **VARIANTS[variant]), "phi3")
    return lambda variant="window": get(variant)


def _ids(seed=3):
    return np.random.RandomState(seed).randint(0, VOCAB, (2, 24))


# -- the forward pass -------------------------------------------------------------------------------

SHORT = np.tile(np.arange(12), 2)[None].repeat(2, 0)  # max position 11 < 16: the short factors


@pytest.mark.parametrize("variant,positions", [("window", None), ("longrope", None), ("longrope", SHORT)])
def test_logits_equal_transformers(variant, positions, phi3, hf_model, close32, logits32_and_64):
    """Positions 0..23 (24 > original_max_position_embeddings = 16) run the long factors, SHORT the short ones."""
    path = phi3(variant)
    ref = hf_model(path)
    if positions is None:
        want, want64 = logits32_and_64(ref, _ids())
    else:
        with torch.no_grad():
            pos = torch.tensor(positions)
            want = ref(torch.tensor(_ids()), position_ids=pos).logits.numpy()
            want64 = ref.double()(torch.tensor(_ids()), position_ids=pos).logits.numpy()
    got = np.asarray(jlora.load_hf(path)(_ids(), positions=positions))
    assert got.shape == want.shape
    close32(got, want, want64, what=f"{variant} positions={'short' if positions is not None else '0..23'}")


def test_longrope_switches_factors_with_length(phi3, hf_model, rel):
    """Guard for the test above: tokens 0..11 at positions 0..11 see the long factors when the batch reaches
    position 23 and the short ones when it stops at 11, in transformers and in jlora alike."""
    path = phi3("longrope")
    ids = _ids()
    with torch.no_grad():
        ref = hf_model(path)
        long_ = ref(torch.tensor(ids)).logits.numpy()[:, :12]
        short = ref(torch.tensor(ids), position_ids=torch.tensor(SHORT)).logits.numpy()[:, :12]
    assert rel(long_, short) > 1e-3
    model = jlora.load_hf(path)
    assert rel(np.asarray(model(ids))[:, :12], np.asarray(model(ids, positions=SHORT))[:, :12]) > 1e-3


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["gate_proj"]])
def test_part_of_a_fused_module_is_an_error(targets, phi3):
    """PEFT cannot adapt q alone inside Phi-3's qkv_proj either: the error names the fused module."""
    with pytest.raises(ValueError, match="qkv_proj|gate_up_proj"):
        jlora.get_peft_model(jlora.load_hf(phi3()), jlora.LoraConfig(r=2, target_modules=targets), rngs=nnx.Rngs(0))


def test_fused_targets_from_split_names():
    """Llama's names (jlora's and Unsloth's default list, the "attention"/"mlp" presets) mean the fused modules
    they make up; prefixes are kept; a regex is PEFT's business and passes through."""
    from jlora.models.fused import fused_targets
    assert fused_targets(list(jlora.LoraConfig().target_modules)) == FUSED
    assert fused_targets(jlora.LoraConfig(target_modules="attention").target_modules) == ["qkv_proj", "o_proj"]
    assert fused_targets(["layers.1.mlp.gate_proj", "layers.1.mlp.up_proj", "qkv_proj"]) == \
        ["layers.1.mlp.gate_up_proj", "qkv_proj"]
    assert fused_targets(r".*\.qkv_proj") == r".*\.qkv_proj"


# -- PEFT and vLLM ----------------------------------------------------------------------------------

EXPORT_CASES = [
    ("window", dict(r=8, lora_alpha=16, use_rslora=True, target_modules=FUSED,
                    rank_pattern={"gate_up_proj": 4, "layers.1.self_attn.qkv_proj": 2}, alpha_pattern={"o_proj": 3})),
    ("longrope", dict(r=4, lora_alpha=8, target_modules=["qkv_proj", "gate_up_proj"])),
]


@pytest.mark.parametrize("variant,kwargs", EXPORT_CASES)
def test_jlora_export_loads_in_peft(variant, kwargs, phi3, tmp_path):
    # max_lora_rank: vLLM's rules, which read phi3 from the base's config.json
    _, saved = jlora_adapter_loads_in_peft(phi3(variant), kwargs, _ids(), tmp_path / "adapter", max_lora_rank=8,
                                           what=f"{variant} {kwargs}")
    assert saved["target_modules"] == kwargs["target_modules"]


def test_peft_saved_adapter_loads_in_jlora(phi3, tmp_path):
    pcfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["qkv_proj", "o_proj", "gate_up_proj"],
                           use_rslora=True, rank_pattern={"qkv_proj": 4}, alpha_pattern={"layers.0.mlp.gate_up_proj": 2},
                           init_lora_weights=False, task_type="CAUSAL_LM")
    peft_adapter_loads_in_jlora(phi3("longrope"), pcfg, _ids(), tmp_path / "peft")


def test_peft_all_linear_adapter_loads(phi3, tmp_path):
    """PEFT's "all-linear" on Phi-3 is the four fused-name projections; the saved config lists them."""
    pcfg = peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    peft_adapter_loads_in_jlora(phi3(), pcfg, _ids(), tmp_path / "peft", torch_seed=1, what="all-linear")


def test_trainable_parameters_equal_peft(phi3, hf_model):
    """jlora's counts (the model's and `jlora ranks`' closed form) equal PEFT's on the fused modules."""
    from jlora.ranks.params import lora_parameter_count
    path = phi3()
    ref = peft.get_peft_model(hf_model(path), peft.LoraConfig(r=8, target_modules=FUSED, task_type="CAUSAL_LM"))
    model = jlora.get_peft_model(jlora.load_hf(path), jlora.LoraConfig(r=8), rngs=nnx.Rngs(0))  # Llama's 7 names
    from jlora.peft_model import adapted_modules
    assert [n for n, _ in adapted_modules(model)] == [f"model.layers.{i}.{p}" for i in range(2) for p in
                                                      ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                                                       "mlp.down_proj")]
    assert jlora.trainable_parameters(model) == tuple(ref.get_nb_trainable_parameters())
    assert lora_parameter_count(model.config, 8, "all-linear") == ref.get_nb_trainable_parameters()[0]


def test_null_target_modules_is_an_error(phi3, tmp_path):
    """PEFT has no default targets for phi3 (it raises); jlora must not guess Llama's q_proj/v_proj."""
    model = jlora.get_peft_model(jlora.load_hf(phi3()), jlora.LoraConfig(r=2), rngs=nnx.Rngs(0))
    jlora.save_pretrained(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": None}))
    with pytest.raises(jlora.CheckpointError, match="target_modules"):
        jlora.load_adapter(jlora.load_hf(phi3()), tmp_path / "a")


def test_config_from_peft_defaults_follow_peft_per_model_type():
    """target_modules null: PEFT's table (llama: q_proj, v_proj; phi3/smollm3: none, PEFT raises); "all-linear":
    the family's projections (phi3: the fused ones)."""
    from jlora.convert.peft_adapter import config_from_peft
    from jlora.module_patterns import PatternError
    assert list(config_from_peft({"target_modules": None}, "llama").target_modules) == ["q_proj", "v_proj"]
    assert list(config_from_peft({"target_modules": "all-linear"}, "phi3").target_modules) == FUSED
    for model_type in ("phi3", "smollm3"):
        with pytest.raises(PatternError, match="target_modules"):
            config_from_peft({"target_modules": None}, model_type)


def test_vllm_rules_follow_the_phi3_packed_mapping():
    """vLLM's Phi3ForCausalLM: packed_modules_mapping = {qkv_proj: [qkv_proj], gate_up_proj: [gate_up_proj]},
    so its expected LoRA modules are the fused names, and q_proj / gate_proj are rejected (Llama: the reverse)."""
    cfg = {"r": 8, "lora_alpha": 8, "target_modules": ["qkv_proj"], "bias": "none"}
    key = "base_model.model.model.layers.0.{}.lora_A.weight"
    fused = [key.format("self_attn.qkv_proj"), key.format("mlp.gate_up_proj")]
    split = [key.format("self_attn.q_proj"), key.format("mlp.gate_proj")]
    assert vllm_violations(cfg, fused, 8, model_type="phi3") == []
    assert len(vllm_violations(cfg, split, 8, model_type="phi3")) == 2
    assert len(vllm_violations(cfg, fused, 8, model_type="llama")) == 2


def test_merged_export_loads_in_transformers(phi3, tmp_path):
    merged_export_loads_in_transformers(phi3("longrope"), dict(r=4, target_modules=FUSED), _ids(), tmp_path / "merged")


def test_lora_gradients_equal_peft(phi3, tmp_path):
    """The training step's gradient (jit, traced positions choosing longrope's long factors, partial rotary,
    the fused modules through the default custom-VJP LoRA op) equals torch autograd through PEFT."""
    path = phi3("longrope")
    model = jlora.get_peft_model(jlora.load_hf(path), jlora.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                                       target_modules=FUSED), rngs=nnx.Rngs(3))
    lora_grads_equal_peft(model, path, lm_batch(_ids(seed=8), VOCAB), tmp_path / "a", n_grads=2 * 4 * 2)


# -- NF4 / QLoRA: transformers + bitsandbytes quantize the fused weights whole --------------------------

QSIZES = dict(TINY, hidden_size=64, intermediate_size=128)  # every row holds whole 64-blocks


def load_bnb(path, quantize=False):
    """transformers + bitsandbytes 4-bit (NF4, double quant) on CPU, bitsandbytes' exact dequantize path
    (tests/qlora/conftest.py explains the AVX-512 BF16 switch)."""
    import bitsandbytes as bnb
    import transformers
    kw = {}
    if quantize:
        kw["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=torch.float32, **kw).eval()
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model


def torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


@pytest.fixture(scope="module")
def qdirs(tmp_path_factory):
    """(dense base, the same quantized and saved by transformers + bitsandbytes)."""
    base = make_phi3(tmp_path_factory.mktemp("phi3-q"), sizes=QSIZES, partial_rotary_factor=0.75)
    out = tmp_path_factory.mktemp("phi3-bnb")
    load_bnb(base, quantize=True).save_pretrained(out, safe_serialization=True)
    return base, out


def test_nf4_equals_transformers_bitsandbytes(qdirs, rel):
    """Quantize-on-load holds, byte for byte, the fused qkv_proj / gate_up_proj NF4 tensors bitsandbytes saved,
    and the 4-bit checkpoint reads back; logits equal transformers + bitsandbytes."""
    from safetensors.numpy import load_file

    from jlora import nf4
    from jlora.peft_model import linear_modules
    base, bnb_dir = qdirs
    ids = _ids()
    want = torch_logits(load_bnb(bnb_dir), ids)
    theirs = load_file(str(bnb_dir / "model.safetensors"))
    model = jlora.load_hf(base, quantize="nf4")
    assert [n for n, _ in linear_modules(model)][:2] == ["model.layers.0.self_attn.qkv_proj",
                                                         "model.layers.0.self_attn.o_proj"]
    for name, linear in linear_modules(model):
        for suffix, array in nf4.to_bnb_tensors(linear.kernel.get_value()).items():
            assert np.ascontiguousarray(array).tobytes() == np.ascontiguousarray(theirs[f"{name}.{suffix}"]).tobytes(), \
                f"{name}.{suffix}"
    assert rel(np.asarray(model(ids)), want) <= 1e-4
    assert rel(np.asarray(jlora.load_hf(bnb_dir)(ids)), want) <= 1e-4


@pytest.mark.slow  # the same PEFT-on-bitsandbytes path tests/qlora runs for Llama; here for the fused modules
def test_qlora_adapter_loads_in_peft_on_bitsandbytes_base(qdirs, rel, tmp_path):
    base, bnb_dir = qdirs
    ids = _ids()
    model = jlora.get_peft_model(jlora.load_hf(base, quantize="nf4"),
                                 jlora.LoraConfig(r=4, init_lora_weights=False, target_modules=FUSED), rngs=nnx.Rngs(2))
    jlora.save_pretrained(model, tmp_path / "adapter")
    ref = peft.PeftModel.from_pretrained(load_bnb(bnb_dir), tmp_path / "adapter").eval()
    want = torch_logits(ref, ids)
    with ref.disable_adapter():
        assert rel(torch_logits(ref, ids), want) > 1e-3, "the adapter must change the logits"
    assert rel(np.asarray(model(ids)), want) <= 1e-4
    jlora.save_quantized(model, tmp_path / "q")  # the NF4 base alone, in bitsandbytes' layout
    assert rel(torch_logits(load_bnb(tmp_path / "q"), ids), torch_logits(load_bnb(bnb_dir), ids)) <= 1e-6


@pytest.mark.slow  # 8 virtual devices in a subprocess, 8 compiled steps (~2-4 min on 2 cores)
def test_sharded_step_equals_single_device(tmp_path):
    """tests/train/sharded_step_check.py on Phi-3 (fused modules column-parallel over tensor=2, so q | k | v
    and gate | up are split across devices before the slices; longrope's long factors; a window): the
    adapter updates of two steps on each mesh (with the kernels under shard_map, and NF4) equal one device's."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    path = make_phi3(tmp_path / "phi3", sizes=QSIZES, sliding_window=8, partial_rotary_factor=0.5,
                     original_max_position_embeddings=8, rope_scaling=VARIANTS["longrope"]["rope_scaling"])
    script = Path(__file__).parents[1] / "train" / "sharded_step_check.py"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, str(script), str(path)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(result["errors"]) == 7
    # Summation order only: measured up to 2.8e-4 here (spread over many adapters, 1e-5 on the plain-rope
    # model; the softmax-gradient cancellations of a random model amplify it), against ~0.3 for a wrong
    # reduction or a q | k | v split taken across the wrong shard (tests/train/test_sharding.py explains).
    for mesh, err in result["errors"].items():
        assert err <= 1e-3, (mesh, err)
    assert result["nf4_split"] == 2 * 4, result  # every fused projection's NF4 codes: 1/8 per device


# -- presets and bad input ----------------------------------------------------------------------------

PHI3_PRESETS = ["phi-3-mini-4k", "phi-4", "phi-4-mini"]
PUBLISHED = {"phi-3-mini-4k": 3_821_079_552, "phi-4": 14_659_507_200,
             "phi-4-mini": 3_836_021_760}


def transformers_meta_count(hf: dict) -> int:
    """Parameters of transformers' model for the same config.json, built on the meta device (no memory)."""
    import transformers
    config = transformers.AutoConfig.for_model(**{k: v for k, v in hf.items() if k != "architectures"})
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", PHI3_PRESETS)
def test_preset_parameter_count(name):
    import jax
    config = jlora.preset_config(name)
    assert config.model_type == "phi3" and config.fused_projections
    model = jlora.abstract_model(config, dtype="bfloat16")
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert total == transformers_meta_count(config.hf_config) == PUBLISHED[name]


@pytest.mark.parametrize("change,field", [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type"),
    ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 4}},
     "short_factor"),
    ({"partial_rotary_factor": 1.5}, "partial_rotary_factor"),
])
def test_unsupported_config_names_field_and_value(change, field):
    import transformers
    hf = transformers.Phi3Config(**TINY).to_dict()
    hf.pop("rope_parameters", None)
    hf.update(architectures=["Phi3ForCausalLM"], **change)
    with pytest.raises(jlora.models.ConfigError, match=field):
        jlora.models.ModelConfig.from_hf_dict(hf)
