"""Qwen3 against transformers' Qwen3ForCausalLM on tiny random checkpoints built with save_pretrained.

What the checkpoints exercise (each would fail the comparison if jlora got it wrong):
- per-head q_norm / k_norm over head_dim before rope, with random weights (ones would hide a missing norm),
- head_dim (16) != hidden / heads (8), no qkv bias, untied and tied heads,
- `use_sliding_window` with `max_window_layers`: layer 1 slides (window 6 < sequence 24), layer 0 does not,
- packed rows, PEFT round trips both ways (random non-zero B, rsLoRA, rank_pattern), the merged export,
  and NF4 against transformers + bitsandbytes.
"""

import numpy as np
import peft
import pytest
import torch
from flax import nnx

import jlora
from tests.hf_checkpoints import built_once, save_random_model
from tests.peft_checks import jlora_adapter_loads_in_peft, lm_batch, lora_grads_equal_peft, peft_adapter_loads_in_jlora

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6,
            rope_theta=1000000.0)
CONFIGS = {
    "qwen3": dict(tie_word_embeddings=False),
    "qwen3-sliding-tied": dict(tie_word_embeddings=True, use_sliding_window=True, sliding_window=6,
                               max_window_layers=1),
}
# Feature sizes multiples of 64: whole NF4 blocks per row (tests/qlora/conftest.py says why).
NF4_SIZES = dict(hidden_size=64, intermediate_size=128)


def _build(out_dir, seed=0, **overrides):
    """A random Qwen3 saved with save_pretrained; every norm weight (q_norm, k_norm too) is 1 + N(0, 0.1^2)."""
    import transformers
    return save_random_model(transformers.Qwen3Config(**{**TINY, **overrides}), out_dir, seed=seed)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    get = built_once(tmp_path_factory, lambda name, out: _build(out, **CONFIGS[name]), "qwen3")
    return lambda name="qwen3": get(name)


def forward(model, ids, positions=None, segment_ids=None) -> np.ndarray:
    """model(ids, positions, segment_ids) as one jitted program (op-by-op dispatch of a first call costs
    several times the compile of the whole forward)."""
    return np.asarray(nnx.jit(lambda m, *a: m(*a))(model, ids, positions, segment_ids))


def _ids(seed=1, t=24):
    return np.random.RandomState(seed).randint(0, TINY["vocab_size"], (2, t))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_equal_transformers(name, qwen3, hf_model, close32, logits32_and_64):
    path = qwen3(name)
    model = jlora.load_hf(path)
    assert model.config.qk_norm and model.config.model_type == "qwen3"
    windows = [layer.self_attn.sliding_window for layer in model.model.layers]
    assert windows == ([None, 6] if "sliding" in name else [None, None])
    want, want64 = logits32_and_64(hf_model(path), _ids())
    close32(forward(model, _ids()), want, want64, what=name)


def test_packed_rows_equal_transformers_per_example(qwen3, hf_model, close32, logits32_and_64, packed_row):
    """Each packed example's logits (sliding layer included, window 6 < the 12-token example) equal
    transformers' on that example alone."""
    path = qwen3("qwen3-sliding-tied")
    examples, row, seg, pos = packed_row(pad=3)
    ref = hf_model(path)
    packed = forward(jlora.load_hf(path), row, pos, seg)
    start = 0
    for ex in examples:
        want, want64 = logits32_and_64(ref, ex[None])
        close32(packed[0, start:start + len(ex)], want[0], want64[0], what=f"example at {start}")
        start += len(ex)


LORA = dict(r=8, lora_alpha=16, use_rslora=True, rank_pattern={"k_proj": 2, "layers.1.mlp.down_proj": 4})


def test_jlora_adapter_loads_in_peft(qwen3, close32, logits32_and_64, hf_model, tmp_path):
    model, _ = jlora_adapter_loads_in_peft(qwen3(), LORA, _ids(), tmp_path / "adapter", forward=forward,
                                           what="jlora -> peft")
    jlora.save_merged(model, tmp_path / "merged", dtype="float32")
    merged, merged64 = logits32_and_64(hf_model(tmp_path / "merged"), _ids())
    close32(forward(model, _ids()), merged, merged64, what="merged export in transformers")


def test_peft_adapter_loads_in_jlora(qwen3, tmp_path):
    pcfg = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["lora_alpha"], use_rslora=True,
                           rank_pattern=LORA["rank_pattern"], target_modules=list(jlora.LoraConfig().target_modules),
                           init_lora_weights=False, task_type="CAUSAL_LM")
    peft_adapter_loads_in_jlora(qwen3("qwen3-sliding-tied"), pcfg, _ids(), tmp_path / "peft", forward=forward)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_lora_gradients_equal_peft(name, qwen3, tmp_path):
    """The training gradient through q_norm / k_norm (per head, before rope), the sliding layer and the tied
    head, on the default custom-VJP path, equals torch autograd through PEFT on transformers."""
    path = qwen3(name)
    model = jlora.get_peft_model(jlora.load_hf(path), jlora.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False),
                                 rngs=nnx.Rngs(3))
    lora_grads_equal_peft(model, path, lm_batch(_ids(seed=8), TINY["vocab_size"]), tmp_path / "a",
                          n_grads=2 * 7 * 2)


def _bitsandbytes(path, quantize: bool = True):
    """transformers + bitsandbytes 4-bit (NF4, double quant): `path` quantized while loading, or a saved 4-bit
    checkpoint; on bitsandbytes' exact dequantize-then-matmul path (its AVX-512 BF16 repack off, as
    tests/qlora/conftest.py explains)."""
    import bitsandbytes as bnb
    import transformers
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                        bnb_4bit_compute_dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, device_map="cpu", dtype=torch.float32, **({"quantization_config": q} if quantize else {})).eval()
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    return model


def test_nf4_equals_bitsandbytes(tmp_path, rel):
    """jlora's quantize-on-load, and its reading of the 4-bit checkpoint transformers + bitsandbytes save
    (q_norm / k_norm stay dense beside the packed projections), both give bitsandbytes' logits; jlora's
    4-bit export loads in transformers + bitsandbytes with the same logits."""
    base = _build(tmp_path / "base", **NF4_SIZES)
    bnb_model = _bitsandbytes(base)
    bnb_model.save_pretrained(tmp_path / "bnb", safe_serialization=True)
    ids = _ids(t=12)
    with torch.no_grad():
        want = bnb_model(torch.tensor(ids)).logits.numpy()
    quantized = jlora.load_hf(base, quantize="nf4")
    for model in (quantized, jlora.load_hf(tmp_path / "bnb")):
        assert isinstance(model.model.layers[0].self_attn.q_proj.kernel, jlora.NF4Weight)
        assert rel(forward(model, ids), want) <= 1e-4
    jlora.save_quantized(quantized, tmp_path / "ours")
    with torch.no_grad():
        exported = _bitsandbytes(tmp_path / "ours", quantize=False)(torch.tensor(ids)).logits.numpy()
    assert rel(exported, want) <= 1e-6
