"""Gemma 2 and Gemma 3 (text) against transformers on tiny random checkpoints built with save_pretrained.

What the checkpoints exercise (each would fail the comparison if jlora got it wrong):
- RMSNorm as x_hat * (1 + w) with random w (w = 0 would hide a missing offset),
- embeddings scaled by sqrt(hidden), GeGLU with tanh-approximated gelu, the four norms per layer,
- query_pre_attn_scalar != head_dim, head_dim != hidden / heads,
- soft-caps small enough that tanh bends the scores (guards check the caps change the logits),
- sliding windows (6) shorter than the sequence (24), with a mixed layer pattern,
- Gemma 3: q/k norms, a local rope base on sliding layers and rope_theta + linear scaling on global ones,
  read from transformers 5's `rope_parameters` per layer type and from the 4.x hub form
  (`rope_local_base_freq`, `rope_scaling`, `sliding_window_pattern`),
- the tied head: PEFT export of a tied-embedding model, merged export, NF4 against bitsandbytes.
"""
import json
import shutil

import numpy as np
import peft
import pytest
import torch
from flax import nnx

import jlora
from tests.hf_checkpoints import save_random_model
from tests.peft_checks import (jlora_adapter_loads_in_peft, lm_batch, lora_grads_equal_peft,
                               merged_export_loads_in_transformers, peft_adapter_loads_in_jlora)
from jlora.models import ConfigError, ModelConfig

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6, sliding_window=6, query_pre_attn_scalar=24)
GEMMA3_ROPE = {"full_attention": dict(rope_type="linear", factor=4.0, rope_theta=50000.0),
               "sliding_attention": dict(rope_type="default", rope_theta=1000.0)}
CONFIGS = {
    # layer_types default: sliding, full, sliding
    "gemma2": ("Gemma2Config", dict(num_hidden_layers=3, attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    # attn_logit_softcapping: transformers' Gemma3Attention never applies it; jlora must not either.
    "gemma3": ("Gemma3TextConfig", dict(
        num_hidden_layers=4, final_logit_softcapping=3.0, attn_logit_softcapping=1.0, rope_parameters=GEMMA3_ROPE,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"])),
}
# Feature sizes multiples of 64 (whole NF4 blocks per row; see tests/qlora/conftest.py).
NF4_SIZES = dict(hidden_size=64, intermediate_size=128, head_dim=16)


def _build(family: str, out_dir, sizes=None, seed: int = 0):
    """A random transformers Gemma model saved with save_pretrained: weights N(0, 0.25^2), norm weights w ~
    N(0, 0.5^2) (Gemma's scale is 1 + w), large enough that both soft-caps bend the logits."""
    import transformers
    cls_name, extra = CONFIGS[family]
    config = getattr(transformers, cls_name)(**{**TINY, **extra, **(sizes or {})})
    return save_random_model(config, out_dir, seed=seed, norm_mean=0.0, norm_std=0.5, weight_std=0.25)


def _legacy_gemma3_config(path):
    """Rewrites a gemma3 checkpoint's config.json in the 4.5x form the hub configs carry (same model)."""
    cfg = json.loads((path / "config.json").read_text())
    for k in ("layer_types", "rope_parameters", "_sliding_window_pattern"):
        cfg.pop(k, None)
    cfg.update(rope_theta=50000.0, rope_local_base_freq=1000.0, rope_scaling={"rope_type": "linear", "factor": 4.0},
               sliding_window_pattern=3)  # (i + 1) % 3 != 0 -> sliding: s, s, full, s as above
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """gemma(name) -> a tiny checkpoint dir: gemma2, gemma3, gemma3-legacy (4.x config form), gemma3-nf4 sizes."""
    cache = {}

    def get(name):
        if name not in cache:
            out = tmp_path_factory.mktemp(name)
            if name == "gemma3-legacy":
                shutil.copytree(get("gemma3"), out, dirs_exist_ok=True)
                cache[name] = _legacy_gemma3_config(out)
            elif name.endswith("-nf4"):
                cache[name] = _build(name[:-4], out, NF4_SIZES)
            else:
                cache[name] = _build(name, out)
        return cache[name]
    return get


def _ids(seed=1, shape=(2, 24)):
    return np.random.RandomState(seed).randint(0, TINY["vocab_size"], shape)


def _forward(model, *args):
    """jlora logits under one jax.jit (eager op-by-op dispatch compiles every primitive: 3-5x slower here)."""
    import jax
    graph, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, *a: nnx.merge(graph, s)(*a))(state, *args))


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


# -- forward ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gemma2", "gemma3", "gemma3-legacy"])
def test_logits_equal_transformers(name, gemma, hf_model, close32, logits32_and_64):
    path = gemma(name)
    want, want64 = logits32_and_64(hf_model(path), _ids())
    got = _forward(jlora.load_hf(path), _ids())
    assert got.shape == want.shape
    close32(got, want, want64, what=name)


def test_soft_caps_and_windows_are_active(gemma, hf_model, rel):
    """Guard: the caps and the window change transformers' logits, so the comparisons above check them."""
    ref = hf_model(gemma("gemma2"))
    want = _logits(ref, _ids())
    assert np.abs(want).max() < 3.0 and np.abs(want).max() > 2.0  # the final cap (3.0) is reached
    for m in ref.modules():
        if hasattr(m, "attn_logit_softcapping"):
            m.attn_logit_softcapping = None
    assert rel(_logits(ref, _ids()), want) > 1e-2
    g3 = hf_model(gemma("gemma3"))
    short = _logits(g3, _ids(shape=(2, 6)))  # within the window, a sliding layer is a full one
    g3.config.sliding_window = 1000
    assert rel(_logits(g3, _ids()), _logits(hf_model(gemma("gemma3")), _ids())) > 1e-3
    assert rel(_logits(g3, _ids(shape=(2, 6))), short) < 1e-6


@pytest.mark.parametrize("name,backend", [("gemma3", "reference"), ("gemma2", "blockwise")])
def test_packed_rows_equal_each_example_alone(name, backend, gemma, hf_model, close32, logits32_and_64, packed_row):
    """Sliding window 6 inside packed segments of 7, 12, 5 tokens; positions restart per example. Blockwise
    attention with 8 x 8 blocks: windows, segments and Gemma 2's soft cap cross block edges."""
    from jlora.attention import BlockSizes, use_attention
    path = gemma(name)
    examples, row, seg, pos = packed_row(pad=4)
    model = use_attention(jlora.load_hf(path), backend, block_sizes=BlockSizes(8, 8))
    packed = _forward(model, row, pos, seg)
    ref, start = hf_model(path), 0
    for ex in examples:
        want, want64 = logits32_and_64(ref, ex[None])
        close32(packed[0, start:start + len(ex)], want[0], want64[0], what=f"{name} {backend} example at {start}")
        start += len(ex)


def test_chunked_loss_applies_the_final_soft_cap(gemma, hf_model, close32, logits32_and_64):
    """The training loss (chunked head) is the cross-entropy of transformers' capped logits."""
    import jax
    from jlora.train.loss import token_loss_sum
    path = gemma("gemma2")
    ids = _ids(seed=5, shape=(2, 17))
    rng = np.random.RandomState(6)
    targets, mask = rng.randint(0, TINY["vocab_size"], ids.shape), (rng.rand(*ids.shape) > 0.3).astype(np.float32)
    batch = dict(inputs=ids, targets=targets, loss_mask=mask, segment_ids=np.ones_like(ids),
                 positions=np.broadcast_to(np.arange(ids.shape[1]), ids.shape))
    graph, state = nnx.split(jlora.load_hf(path))
    total, count = jax.jit(lambda s, b: token_loss_sum(nnx.merge(graph, s), b, chunk_tokens=8))(state, batch)
    # 8 tokens a chunk: 4 positions x 2 rows, 5 chunks (the last padded)

    def ce(z):
        z = z.astype(np.float64)
        lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
        return float(np.sum(mask * (lse - np.take_along_axis(z, targets[..., None], -1)[..., 0])))
    ref = hf_model(path)
    want, want64 = logits32_and_64(ref, ids)
    assert float(count) == mask.sum()
    close32(np.float64(total), ce(want), ce(want64), what="chunked loss")
    ref.config.final_logit_softcapping = None
    assert abs(ce(_logits(ref, ids)) - ce(want)) > 1e-2 * ce(want)  # guard: the cap matters for the loss


def test_bfloat16_rounds_as_transformers(gemma, hf_model, rel):
    """bf16: the norm scales by (1 + w) in float32 and casts once at the end (Llama casts before scaling), the
    embedding scale is rounded float64 -> float32 -> bf16 as transformers' buffer is; logits stay close."""
    import jax.numpy as jnp
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from jlora.models.layers import RMSNorm
    rng = np.random.RandomState(0)
    x = torch.tensor(rng.standard_normal((8, 64)) * 3, dtype=torch.bfloat16)
    w = torch.tensor(rng.standard_normal(64), dtype=torch.bfloat16)
    ref = Gemma2RMSNorm(64, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        ref.weight.copy_(w)
        want = ref(x).float().numpy()
    norm = RMSNorm(64, eps=1e-6, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, offset=1.0)
    norm.weight[...] = jnp.asarray(w.float().numpy(), jnp.bfloat16)
    got = np.asarray(norm(jnp.asarray(x.float().numpy(), jnp.bfloat16)), np.float32)
    assert np.abs(got - want).max() <= 2.0 ** -7 * np.abs(want).max()  # at most one bf16 rounding apart
    assert np.mean(got == want) > 0.97
    for name in PRESET_NAMES:
        h = jlora.preset_config(name).hidden_size
        ours = float(jnp.asarray(jlora.preset_config(name).embedding_scale, jnp.bfloat16))
        assert ours == torch.tensor(h ** 0.5).to(torch.bfloat16).item(), name
    path = gemma("gemma3")
    with torch.no_grad():
        want = hf_model(path)(torch.tensor(_ids())).logits.numpy()
    assert rel(np.asarray(_forward(jlora.load_hf(path, dtype="bfloat16"), _ids()), np.float32), want) <= 5e-2


# -- adapters and exports --------------------------------------------------------------------------------

PEFT_CASES = [
    ("gemma2", dict(r=8, lora_alpha=16, use_rslora=True, rank_pattern={"down_proj": 4},
                    alpha_pattern={"layers.1.self_attn.q_proj": 32})),
    ("gemma3", dict(r=4, lora_alpha=8, rank_pattern={"k_proj": 2})),
]


@pytest.mark.parametrize("name,kwargs", PEFT_CASES)
def test_jlora_adapter_loads_in_peft(name, kwargs, gemma, tmp_path):
    jlora_adapter_loads_in_peft(gemma(name), kwargs, _ids(), tmp_path / "adapter", max_lora_rank=64, forward=_forward,
                                min_change=1e-3, what=f"{name} {kwargs}")


def test_peft_adapter_loads_in_jlora(gemma, tmp_path):
    pcfg = peft.LoraConfig(target_modules=list(jlora.LoraConfig().target_modules), init_lora_weights=False,
                           task_type="CAUSAL_LM", **PEFT_CASES[0][1])
    peft_adapter_loads_in_jlora(gemma("gemma3"), pcfg, _ids(), tmp_path / "peft", forward=_forward)


def test_merged_export_loads_in_transformers(gemma, tmp_path):
    merged_export_loads_in_transformers(gemma("gemma2"), dict(r=8), _ids(), tmp_path / "merged", forward=_forward,
                                        min_change=1e-3)


def test_lora_gradients_equal_peft(gemma, tmp_path):
    """The training gradient through both soft caps, the sliding window, blockwise attention's backward (8 x 8
    blocks) and the chunked head (8 tokens a chunk) equals torch autograd through PEFT on transformers."""
    from jlora.attention import BlockSizes, use_attention
    path = gemma("gemma2")
    model = jlora.get_peft_model(jlora.load_hf(path), jlora.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False),
                                 rngs=nnx.Rngs(3))
    use_attention(model, "blockwise", block_sizes=BlockSizes(8, 8))
    lora_grads_equal_peft(model, path, lm_batch(_ids(seed=8, shape=(2, 20)), TINY["vocab_size"]), tmp_path / "a",
                          chunk_tokens=8, n_grads=3 * 7 * 2)


def _load_bnb(path, quantize: bool):
    """transformers + bitsandbytes 4-bit (NF4, double quant, float32 compute) on its exact dequantize path."""
    import bitsandbytes as bnb
    import transformers
    kw = {}
    if quantize:
        kw["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=torch.float32,
                                                              **kw).eval()
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m in linears:
        m.support_avx512bf16_for_cpu = False  # see tests/qlora/conftest.py
    assert len(linears) == 7 * model.config.num_hidden_layers
    return model


def test_nf4_equals_bitsandbytes(gemma, rel, tmp_path):
    """Quantize-on-load equals transformers + bitsandbytes; its saved 4-bit checkpoint loads to the same logits."""
    import transformers
    path = gemma("gemma3-nf4")
    ids = _ids(shape=(2, 12))
    bnb_model = _load_bnb(path, quantize=True)
    want = _logits(bnb_model, ids)
    assert rel(_forward(jlora.load_hf(path, quantize="nf4", dtype="float32"), ids), want) <= 1e-4
    bnb_model.save_pretrained(tmp_path / "bnb", safe_serialization=True)
    assert rel(_forward(jlora.load_hf(tmp_path / "bnb", dtype="float32"), ids), want) <= 1e-4
    dense = _logits(transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), ids)
    assert rel(want, dense) > 1e-3  # guard: 4-bit logits are not the dense ones


@pytest.mark.slow
def test_qlora_export_runs_in_transformers_bitsandbytes_peft(gemma, rel, tmp_path):
    """A QLoRA model's save_quantized base + its adapter give jlora's logits in transformers + bitsandbytes + PEFT."""
    path = gemma("gemma3-nf4")
    ids = _ids(shape=(2, 12))
    qlora = jlora.load_hf(path, quantize="nf4", dtype="float32")
    base = _forward(qlora, ids)
    qlora = jlora.get_peft_model(qlora, jlora.LoraConfig(r=4, init_lora_weights=False), rngs=nnx.Rngs(0))
    jlora.save_quantized(qlora, tmp_path / "q")
    jlora.save_pretrained(qlora, tmp_path / "adapter")
    ref = peft.PeftModel.from_pretrained(_load_bnb(tmp_path / "q", quantize=False), tmp_path / "adapter").eval()
    got, want = _forward(qlora, ids), _logits(ref, ids)
    assert rel(got, want) <= 1e-4 and rel(got, base) > 1e-3


# -- configs and presets ---------------------------------------------------------------------------------

MINIMAL = dict(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=7, num_attention_heads=4)


@pytest.mark.parametrize("cls_name,arch", [("Gemma2Config", "Gemma2ForCausalLM"),
                                           ("Gemma3TextConfig", "Gemma3ForCausalLM")])
def test_absent_keys_take_transformers_defaults(cls_name, arch):
    """A config.json holding only the sizes reads as transformers' full config of the same sizes does."""
    import transformers
    full = getattr(transformers, cls_name)(**MINIMAL).to_dict()
    minimal = {"architectures": [arch], "model_type": full["model_type"], **MINIMAL}
    assert ModelConfig.from_hf_dict(minimal) == ModelConfig.from_hf_dict(full)


def test_gemma3_rope_and_layer_pattern_read_like_transformers():
    """4.x hub form (rope_local_base_freq, rope_scaling, sliding_window_pattern) == transformers' 5.x form."""
    import transformers
    legacy = dict(MINIMAL, rope_theta=2e5, rope_local_base_freq=3e3, rope_scaling={"rope_type": "linear", "factor": 2.0},
                  sliding_window_pattern=3, sliding_window=7)
    full = transformers.Gemma3TextConfig(**legacy).to_dict()
    assert full["layer_types"][2] == "full_attention" and full["rope_parameters"]["sliding_attention"]["rope_theta"] == 3e3
    ours = ModelConfig.from_hf_dict({"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", **legacy})
    assert ours == ModelConfig.from_hf_dict(full)
    assert [s.sliding_window for s in ours.layer_specs] == [7, 7, None, 7, 7, None, 7]
    assert [s.rope for s in ours.layer_specs] == ["local", "local", "global", "local", "local", "global", "local"]
    assert (ours.rope_theta, ours.rope_scaling_dict, ours.rope_local_theta, ours.rope_local_scaling) == \
        (2e5, {"rope_type": "linear", "factor": 2.0}, 3e3, None)


@pytest.mark.parametrize("arch,change,match", [
    ("Gemma3ForCausalLM", dict(rope_parameters={"full_attention": {"rope_type": "yarn", "factor": 4.0}}),
     r"rope_parameters.full_attention.rope_type='yarn'"),
    ("Gemma3ForCausalLM", dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), r"rope_type='dynamic'"),
    # transformers 5.24 keeps rope_type "default" here and drops the scaling: refused rather than guessed
    ("Gemma3ForCausalLM", dict(rope_scaling={"type": "linear", "factor": 8.0}), r"rope_scaling.type='linear'"),
    ("Gemma3ForCausalLM", dict(use_bidirectional_attention=True), r"use_bidirectional_attention=True"),
    ("Gemma2ForCausalLM", dict(hidden_activation="gelu"), r"hidden_activation='gelu'"),
    ("Gemma2ForCausalLM", dict(final_logit_softcapping=0.0), r"final_logit_softcapping .*found 0.0"),
    ("Gemma2ForCausalLM", dict(layer_types=["sliding_attention"] * 6 + ["chunked_attention"]),
     r"layer_types\[6\]='chunked_attention'"),
    ("Gemma3ForConditionalGeneration", dict(model_type="gemma3"), r"Gemma3ForConditionalGeneration.*gemma3_text"),
])
def test_unsupported_config_values_name_field_and_value(arch, change, match):
    model_type = {"Gemma2ForCausalLM": "gemma2"}.get(arch, "gemma3_text")
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_hf_dict({"architectures": [arch], "model_type": model_type, **MINIMAL, **change},
                                 where="cfg.json")


PRESET_NAMES = ["gemma-2-2b", "gemma-2-9b", "gemma-2-27b", "gemma-3-1b", "gemma-3-4b", "gemma-3-12b", "gemma-3-27b"]


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_preset_reads_as_transformers_normalises_it(name):
    """A preset (the hub's 4.x config form) reads the same as transformers 5's normalised config of it
    (layer_types, rope_parameters per layer type): same windows, rope tables, caps and scales."""
    import transformers
    d = jlora.PRESETS[name]
    full = transformers.AutoConfig.for_model(**{k: v for k, v in d.items() if k != "architectures"}).to_dict()
    assert ModelConfig.from_hf_dict(d) == ModelConfig.from_hf_dict({**full, "architectures": d["architectures"]})


def _jlora_count(name):
    import jax
    model = jlora.abstract_model(jlora.preset_config(name), dtype="bfloat16")
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _transformers_count(name):
    import transformers
    d = {k: v for k, v in jlora.PRESETS[name].items() if k != "architectures"}
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**d))
    return sum(p.numel() for p in model.parameters())  # the tied head counted once


# Published sizes (safetensors totals; Gemma 3 4B/12B/27B: the language model of the multimodal release).
PUBLISHED = {"gemma-2-2b": 2_614_341_888, "gemma-2-9b": 9_241_705_984, "gemma-2-27b": 27_227_128_320,
             "gemma-3-1b": 999_885_952}


@pytest.mark.parametrize("name", [
    "gemma-2-27b", "gemma-3-1b",  # head_dim 128 with query_pre_attn_scalar 144; one kv head
    *[pytest.param(n, marks=pytest.mark.slow) for n in PRESET_NAMES if n not in ("gemma-2-27b", "gemma-3-1b")]])
def test_preset_parameter_count_equals_transformers(name):
    count = _jlora_count(name)
    assert count == _transformers_count(name)
    assert count == PUBLISHED.get(name, count)
