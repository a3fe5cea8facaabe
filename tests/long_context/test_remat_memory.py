""""dots" saves the projections' outputs in the compute dtype (jlora.remat.PROJECTION), so on a bf16 base it holds
less than "none" and more than "full": what one layer saves (jax's saved_residuals), what the compiled step holds
(XLA:CPU's memory analysis of a scanned model, where XLA keeps rematerialization; a loop of layers it undoes),
and the gradients, which remat never changes.

Expected bytes come from the config, not from the code: per token and layer the named outputs are
q + k + v + o + gate + up features (down_proj's output only feeds the residual add, whose backward needs
nothing) at 2 bytes each.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jlora
from jlora.attention import use_attention
from jlora.llama import init_random
from jlora.llama_config import LlamaConfig
from jlora.models.stacked import stack_layers
from jlora.remat import call_layer
from jlora.train.state import SplitModel
from jlora.train.step import make_train_step

CONFIG = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=256, max_position_embeddings=1024, rms_norm_eps=1e-5)
HEAD_DIM = 64 // 4
# q, k, v, o, gate, up output features per token: the bf16 values "dots" keeps per layer
SAVED_FEATURES = 4 * HEAD_DIM + 2 * 2 * HEAD_DIM + 64 + 2 * 128


def _model(layers=2, scan=False):
    config = LlamaConfig.from_hf_dict(dict(CONFIG, num_hidden_layers=layers))
    lora = jlora.LoraConfig(r=8, lora_alpha=8, init_lora_weights=False)  # B != 0: every LoRA gradient is live
    model = jlora.get_peft_model(init_random(config, dtype="bfloat16"), lora, rngs=nnx.Rngs(1))
    use_attention(model, "blockwise")
    return stack_layers(model) if scan else model


def test_dots_saves_bf16_projection_outputs():
    """One bf16 layer under "dots": besides its inputs, exactly the six named projection outputs, all bf16."""
    from jax._src.ad_checkpoint import saved_residuals

    layer = _model(layers=1).model.layers[0]
    rows, t = 2, 32
    h = jnp.ones((rows, t, 64), jnp.bfloat16)
    cos = sin = jnp.ones((rows, t, HEAD_DIM), jnp.float32)
    seg = jnp.ones((rows, t), jnp.int32)
    graphdef, state = nnx.split(layer)
    saved = saved_residuals(lambda st, h: call_layer(nnx.merge(graphdef, st), "dots", h, cos, sin, seg), state, h)
    named = [aval for aval, why in saved if "named 'jlora_projection'" in why]
    others = [why for _, why in saved if "named" not in why and "argument" not in why and "constant" not in why]
    assert not others, others  # nothing else is stored: no float32 products
    assert {a.dtype for a in named} == {jnp.dtype(jnp.bfloat16)}, named
    assert sorted(a.shape[-1] for a in named) == sorted([4 * HEAD_DIM, 2 * HEAD_DIM, 2 * HEAD_DIM, 64, 128, 128])
    assert sum(a.size for a in named) == rows * t * SAVED_FEATURES


def _temporaries(layers, policy, rows=2, t=256):
    model = _model(layers, scan=True)
    model.remat = policy
    split = SplitModel.of(model)
    params, tx = split.params(), optax.sgd(1e-3)
    batch = {k: jax.ShapeDtypeStruct((1, rows, t), jnp.int32)
             for k in ("inputs", "targets", "loss_mask", "positions", "segment_ids")}
    compiled = jax.jit(make_train_step(split, tx)).lower(params, tx.init(params), split.frozen, batch,
                                                        jax.random.key(0), jnp.asarray(0)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_compiled_temporaries_order_and_dots_bytes():
    """Per layer (the slope between 2 and 6 scanned layers, which cancels the step's fixed buffers):
    none > dots > full, and dots - full lies between 1x and 3x the named outputs' bytes (measured 2.1x: XLA
    holds the scan's stacked residuals twice; the float32 products of the old policy would be 2x more again)."""
    rows, t = 2, 256
    slope = {p: (_temporaries(6, p, rows, t) - _temporaries(2, p, rows, t)) / 4 for p in ("none", "dots", "full")}
    assert slope["none"] > slope["dots"] > slope["full"] > 0, slope
    named = rows * t * SAVED_FEATURES * 2
    assert named <= slope["dots"] - slope["full"] <= 3 * named, (slope, named)


@pytest.mark.slow
def test_dots_gradients_equal_none():
    """A scanned bf16 model: the LoRA gradients under "dots" are the ones under "none" (same operations,
    recomputed; bf16 rounding may differ only where XLA fuses differently)."""
    rng = np.random.RandomState(0)
    tokens = rng.randint(3, 250, (2, 65))
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((2, 64), np.int32),
             "positions": np.broadcast_to(np.arange(64), (2, 64)), "segment_ids": np.ones((2, 64), np.int32)}
    batch = {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}
    from jlora.train.loss import token_loss_sum

    model = _model(2, scan=True)
    grads = {}
    for policy in ("none", "dots"):
        model.remat = policy
        split = SplitModel.of(model)
        grads[policy] = jax.jit(jax.grad(
            lambda p: token_loss_sum(split.model(p, split.frozen), batch)[0]))(split.params())
    for a, b in zip(jax.tree.leaves(grads["none"]), jax.tree.leaves(grads["dots"])):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.abs(a).max() > 0
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-2 * np.abs(a).max())
