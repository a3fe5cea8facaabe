"""Rotary embedding's written-out backward (jlora.models.rope._rotate) against transformers' rotary under
float64 torch autograd, in float32 and bfloat16, with full and partial rotary dims."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora.models.rope import apply_rotary, cos_sin

EPS = {"float32": 2.0 ** -24, "bfloat16": 2.0 ** -8}  # unit roundoff (bf16: one ulp, round-to-nearest-even ties)


def _inputs(dtype, head_dim, rotary_dim):
    k = jax.random.split(jax.random.key(0), 2)
    b, t, h = 2, 7, 3
    positions = jnp.broadcast_to(jnp.arange(t) * 3 + 1, (b, t))
    inv_freq = (1.0 / 10000.0 ** (np.arange(0, rotary_dim, 2) / rotary_dim)).astype(np.float32)
    cos, sin = cos_sin(positions, inv_freq)
    x = jax.random.normal(k[0], (b, t, h, head_dim), jnp.float32).astype(dtype)
    dy = jax.random.normal(k[1], (b, t, h, head_dim), jnp.float32).astype(dtype)
    return x, dy, cos, sin


def _transformers_grad64(x, dy, cos, sin, dtype):
    """d/dx sum(rope(x) * dy) by torch autograd of transformers' apply_rotary_pos_emb in float64, on the
    values jlora computes with (cos, sin rounded to x's dtype first, as apply_rotary does)."""
    import torch
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    def t64(a):
        return torch.tensor(np.asarray(jnp.asarray(a).astype(jnp.float32)), dtype=torch.float64)
    rotary = cos.shape[-1]
    xt = t64(x).transpose(1, 2).requires_grad_(True)  # [b, h, t, d]
    c, s = t64(cos.astype(dtype)), t64(sin.astype(dtype))
    q_rot, _ = apply_rotary_pos_emb(xt[..., :rotary], xt[..., :rotary], c, s)
    out = torch.cat([q_rot, xt[..., rotary:]], dim=-1)
    (out * t64(dy).transpose(1, 2)).sum().backward()
    grad = xt.grad.transpose(1, 2).numpy()
    # what each rounding of the backward is relative to, elementwise: |dy_i cos_i| + |dy_j sin_j|, j the
    # partner dim in the other half (dx_i = dy_i cos_i -+ dy_j sin_j)
    d = np.abs(t64(dy).numpy())[..., :rotary]
    dsin = d * np.abs(s.numpy())[:, :, None, :]
    half = rotary // 2
    scale = d * np.abs(c.numpy())[:, :, None, :] + np.concatenate([dsin[..., half:], dsin[..., :half]], -1)
    return grad, scale


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("head_dim,rotary_dim", [(8, 8), (12, 8)])
def test_rotary_gradient_matches_transformers_float64(dtype, head_dim, rotary_dim):
    x, dy, cos, sin = _inputs(jnp.dtype(dtype), head_dim, rotary_dim)
    _, vjp = jax.vjp(lambda v: apply_rotary(v, cos, sin), x)
    (got,) = vjp(dy)
    assert got.dtype == x.dtype
    got = np.asarray(got.astype(jnp.float32), np.float64)
    ref, scale = _transformers_grad64(x, dy, cos, sin, jnp.dtype(dtype))
    # rotated dims: two products, a negation and a sum, each rounded: <= 3 roundings of |dy|(|cos| + |sin|)
    bound = 3 * EPS[dtype] * scale + 1e-30
    err = np.abs(got[..., :rotary_dim] - ref[..., :rotary_dim])
    assert (err <= bound).all(), f"rotary gradient off by {float((err / bound).max()):.3g} x its rounding bound"
    # dims past rotary_dim pass through: their gradient is dy exactly
    np.testing.assert_array_equal(got[..., rotary_dim:], ref[..., rotary_dim:])


def test_rotary_gradient_is_autodiffs_bit_for_bit():
    """The written-out backward emits autodiff's operations in the same dtype (the module docstring's claim)."""
    x, dy, cos, sin = _inputs(jnp.bfloat16, 8, 8)
    c, s = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)

    def plain(v):
        half = v.shape[-1] // 2
        return v * c + jnp.concatenate([-v[..., half:], v[..., :half]], axis=-1) * s
    got = jax.jit(lambda v, g: jax.vjp(lambda u: apply_rotary(u, cos, sin), v)[1](g)[0])(x, dy)
    want = jax.jit(lambda v, g: jax.vjp(plain, v)[1](g)[0])(x, dy)
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))


def test_rope_tables_are_the_cos_sin_values():
    """rope_tables hands every layer cos/sin of positions * inv_freq: against float64 numpy, and bit for bit
    the plain cos_sin (on CPU the tables pass through an identity product, which must change nothing)."""
    from jlora.llama_config import LlamaConfig
    from jlora.models.rope import inverse_frequencies, rope_tables
    config = LlamaConfig(vocab_size=32, hidden_size=48, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=24, rope_theta=500000.0)
    positions = jax.random.randint(jax.random.key(0), (2, 9), 0, 4096)
    cos, sin = jax.jit(lambda p: rope_tables(config, p)["global"])(positions)
    plain_cos, plain_sin = jax.jit(lambda p: cos_sin(p, inverse_frequencies(config)))(positions)
    np.testing.assert_array_equal(np.asarray(cos), np.asarray(plain_cos))
    np.testing.assert_array_equal(np.asarray(sin), np.asarray(plain_sin))
    inv = np.asarray(inverse_frequencies(config), np.float64)
    angles = np.asarray(positions, np.float64)[..., None] * np.concatenate([inv, inv])
    # float32 angles of size up to ~4096 carry ~4096 * 2^-24 absolute error; cos/sin add one rounding
    np.testing.assert_allclose(np.asarray(cos, np.float64), np.cos(angles), rtol=0, atol=4096 * 2.0 ** -23)
    np.testing.assert_allclose(np.asarray(sin, np.float64), np.sin(angles), rtol=0, atol=4096 * 2.0 ** -23)
