"""Generation on a scanned model (`load_hf(..., scan_layers=True)`): the KV cache, stacked on the layer axis,
rides through the scan. Greedy tokens equal the loop model's and transformers' (float32), for Llama (period
1, left-padded rows stopping at eos) and Gemma 2 (period 2: sliding and global layers alternate, with a
looped tail layer)."""
import pytest

import jlora
from jlora.generate.decode import generate_tokens
from jlora.models.stacked import is_stacked
from tests.generate.test_families import _build
from tests.generate.test_greedy import N, _check, _eos_for, _prompts, hf_greedy


def _tokens(outputs):
    return [o.token_ids for o in outputs]


def test_scanned_llama_greedy_equals_loop_and_transformers(checkpoint, hf_model):
    path = checkpoint("llama")
    ref, prompts = hf_model(path), _prompts()
    eos = _eos_for(hf_greedy(ref, prompts, N, None)[0])
    want, gap = hf_greedy(ref, prompts, N, eos)
    scanned = jlora.load_hf(path, scan_layers=True)
    assert is_stacked(scanned) and scanned.model.layers.groups == scanned.config.num_hidden_layers
    got = generate_tokens(scanned, prompts, max_new_tokens=N, eos_token_ids=[eos])
    _check(got, want, gap, "scanned llama")
    loop = generate_tokens(jlora.load_hf(path), prompts, max_new_tokens=N, eos_token_ids=[eos])
    assert _tokens(got) == _tokens(loop)
    assert is_stacked(scanned)  # generation did not unstack it


@pytest.mark.slow  # its own compilation (~7 s of CPU); the llama case covers the scan in the default run
def test_scanned_gemma2_period_two_with_tail_equals_transformers(tmp_path, hf_model, monkeypatch):
    from tests.generate import test_families
    cls_name, extra = test_families.CONFIGS["gemma2"]
    # 5 layers, windows alternating: two scanned periods of 2 and one looped tail layer
    monkeypatch.setitem(test_families.CONFIGS, "gemma2", (cls_name, {**extra, "num_hidden_layers": 5}))
    path = _build("gemma2", tmp_path / "gemma2")
    ref, prompts = hf_model(path), _prompts()
    want, gap = hf_greedy(ref, prompts, N, None)
    assert gap > 1e-5, f"transformers' top-2 logits differ by only {gap}"
    scanned = jlora.load_hf(path, scan_layers=True)
    stack = scanned.model.layers
    assert (stack.period, stack.groups, len(stack.tail)) == (2, 2, 1)
    got = generate_tokens(scanned, prompts, max_new_tokens=N)
    assert _tokens(got) == want


def _decode_program_size(layers: int, scan: bool) -> int:
    """Characters of the lowered decode loop (shapes only: an abstract LoRA model, nothing computed)."""
    import functools

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jlora.generate.decode import jitted
    from jlora.generate.sampler import SamplingConfig
    from jlora.models import ModelConfig
    from jlora.models.stacked import stack_layers

    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = nnx.eval_shape(lambda: jlora.get_peft_model(jlora.init_random(config), jlora.LoraConfig(r=2),
                                                        rngs=nnx.Rngs(0)))
    if scan:
        stack_layers(model)
    graphdef, state = nnx.split(model)
    prefill, decode = jitted(graphdef)
    statics = dict(sampling=SamplingConfig(), eos=(1,), pad=0)
    i32 = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.int32)
    carry = jax.eval_shape(functools.partial(prefill, max_len=128, **statics), state, i32((2, 64)), i32((2,)),
                           jax.ShapeDtypeStruct((2,), jnp.bool_), i32(()))
    return len(decode.lower(state, carry, i32(()), i32(()), **statics).as_text())


def test_scanned_decode_program_does_not_grow_with_depth():
    """What makes a deep (70B) model's generation compile once: the scanned decode step holds one layer body."""
    scan2, scan8 = _decode_program_size(2, True), _decode_program_size(8, True)
    loop2, loop8 = _decode_program_size(2, False), _decode_program_size(8, False)
    assert scan8 / scan2 < 1.2, (scan2, scan8)
    assert loop8 / loop2 > 2.5, (loop2, loop8)  # guard: the measure sees depth in the loop model
