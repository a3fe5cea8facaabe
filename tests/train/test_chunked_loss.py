"""The chunked cross-entropy equals the whole computation: value and gradients against float64 (numpy)
and, through a LoRA model, against PEFT (torch autograd in float32 and float64)."""
import numpy as np
import pytest
from flax import nnx

import jax
import jax.numpy as jnp
import jlora
from jlora.train.chunked_loss import chunk_positions, chunked_cross_entropy_sum
from tests.peft_checks import lora_grads_equal_peft

EPS32 = 2.0 ** -23


def _numpy_loss_and_grads(h, w, targets, mask):
    """float64: loss = sum mask * (lse(z) - z[target]), z = h @ w; dL/dz = mask * (softmax(z) - onehot)."""
    h, w = h.astype(np.float64), w.astype(np.float64)
    z = h @ w
    zmax = z.max(-1, keepdims=True)
    lse = np.log(np.exp(z - zmax).sum(-1)) + zmax[..., 0]
    picked = np.take_along_axis(z, targets[..., None], -1)[..., 0]
    loss = np.sum(mask * (lse - picked))
    dz = np.exp(z - lse[..., None])
    np.put_along_axis(dz, targets[..., None], np.take_along_axis(dz, targets[..., None], -1) - 1, -1)
    dz *= mask[..., None]
    return loss, dz @ w.T, np.einsum("btd,btv->dv", h, dz)


@pytest.mark.parametrize("chunk_tokens", [10, 30, 1, 10_000])
def test_value_and_grads_equal_float64(chunk_tokens):
    """vocab 101 and 37 positions: neither is a multiple of the chunk (3 rows x 3 positions at 10 tokens),
    so the last chunk is padded. Bound: float32 rounding over the reductions (hidden, vocab, tokens)."""
    rows, t, d, v = 3, 37, 16, 101
    rng = np.random.RandomState(0)
    h = rng.randn(rows, t, d).astype(np.float32)
    w = (rng.randn(d, v) / 2).astype(np.float32)
    targets = rng.randint(0, v, (rows, t)).astype(np.int32)
    mask = (rng.rand(rows, t) > 0.3).astype(np.float32)
    targets[mask == 0] = 10 ** 6  # out of range where masked: must still add exact zeros

    def loss(h, w, scale):
        return scale * chunked_cross_entropy_sum(lambda x: x @ w, h, jnp.asarray(targets), jnp.asarray(mask),
                                                 chunk_tokens=chunk_tokens)

    args = jnp.asarray(h), jnp.asarray(w), jnp.float32(0.25)  # the cotangent reaching the loss is 0.25
    value, dh = jax.jit(jax.value_and_grad(loss))(*args)
    primal = jax.jit(loss)(*args)  # the primal (eval) path: no gradient formed
    targets[mask == 0] = 0
    want, want_dh, _ = _numpy_loss_and_grads(h, w, targets, mask)
    want, want_dh = 0.25 * want, 0.25 * want_dh
    n = rows * t
    slack = 8 * (d + v + n) * EPS32
    for got in (value, primal):
        assert abs(float(got) - want) <= slack * 0.25 * np.sum(mask * np.abs(h @ w).max(-1)) + slack * abs(want)
    assert np.isfinite(np.asarray(dh)).all()
    assert np.abs(np.asarray(dh, np.float64) - want_dh).max() <= slack * np.abs(want_dh).max()


def test_head_weights_are_frozen():
    """The chunked path forms only the hidden states' gradient: asking for the head's is an error, not a zero."""
    h, w = jnp.ones((1, 6, 4)), jnp.ones((4, 5))
    t, m = jnp.zeros((1, 6), jnp.int32), jnp.ones((1, 6))

    def loss(w):
        return chunked_cross_entropy_sum(lambda x: x @ w, h, t, m, chunk_tokens=2)

    with pytest.raises(Exception, match="(?i)unexpected tracer|custom_vjp"):
        jax.grad(loss)(w)


def test_chunk_positions():
    assert chunk_positions(3, 37, 10) == 3
    assert chunk_positions(4, 100, 2) == 1       # at least one position
    assert chunk_positions(2, 50, 10_000) == 50  # at most the sequence: the plain computation
    with pytest.raises(ValueError, match="chunk_tokens must be >= 1"):
        chunked_cross_entropy_sum(lambda x: x, jnp.zeros((1, 2, 3)), jnp.zeros((1, 2), jnp.int32),
                                  jnp.ones((1, 2)), chunk_tokens=0)


def _batch(rows=2, t=23):
    rng = np.random.RandomState(5)
    tokens = rng.randint(3, 96, (rows, t + 1))
    mask = (rng.rand(rows, t) > 0.2).astype(np.int32)
    return {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
            "loss_mask": mask, "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (rows, t)),
            "segment_ids": np.ones((rows, t), np.int32)}


@pytest.mark.parametrize("family", ["llama", "llama-tied"])
def test_model_loss_and_lora_grads_equal_peft(family, checkpoint, tmp_path):
    """lm_head and tied embeddings: the chunked loss (8 tokens a chunk: 4 positions of 2 rows, 23
    positions padded to 24) and every LoRA gradient equal PEFT's, within PEFT's own float32 error."""
    model = jlora.get_peft_model(jlora.load_hf(checkpoint(family)),
                                 jlora.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False), rngs=nnx.Rngs(3))
    lora_grads_equal_peft(model, checkpoint(family), _batch(), tmp_path / "a", chunk_tokens=8)
