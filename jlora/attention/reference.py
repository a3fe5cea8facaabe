"""The materialized attention: every score of the row at once. The path all others are tested against.

    s = (q k^T rounded to q's dtype) * scale;  s = cap * tanh(s / cap) when logit_softcap=cap (Gemma 2)
    p = softmax(s + mask) in float32, then rounded to q's dtype;  out = p v  (float32 accumulation)
    scores [batch, kv_heads, group, T, T] (the cap is applied after scaling, before masking, as
    transformers' Gemma 2 eager attention does; transformers' eager path rounds q k^T the same way)

Backward (a custom_vjp: the derivative of the forward above, written out; tests compare it with a float64
numpy attention):

    dv = p^T dout,  dp = dout v^T (rounded to q's dtype),  ds = p * (dp - rowsum(dp * p))  (float32)
    (soft cap: ds *= 1 - tanh^2),  dq = ds k * scale,  dk = ds^T q * scale      (ds rounded to q's dtype)

Why written out rather than left to autodiff: with autodiff, XLA:CPU lays the float32 [T, T]
probabilities and their cotangent out transposed for the dv and dk products and copies them each layer;
this backward keeps every product in one (g, t) order (float32 toy shape: attention forward + backward
about 2x faster, benchmarks/RESULTS.md).

Memory O(T^2) per layer: the backward keeps p in q's dtype (the same rounded p the forward multiplies v by;
in bfloat16 ds then carries one more rounding than autodiff's float32 p, within bf16's own error), and
tanh(s / cap) under a soft cap. Fine for short rows; the reference everywhere.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jlora.attention.masks import attention_mask, check_softcap

_F32 = jnp.float32
_MIN = float(jnp.finfo(jnp.float32).min)


def reference_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, segment_ids: jnp.ndarray, *,
                        sliding_window: int | None = None, scale: float,
                        logit_softcap: float | None = None) -> jnp.ndarray:
    """q [b, t, kv_heads, group, d], k and v [b, t, kv_heads, d], segment_ids [b, t] -> [b, t, kv_heads, group, d]."""
    check_softcap(logit_softcap)
    mask = attention_mask(segment_ids, sliding_window)
    # head-major operands ([b, k, g, t, d], [b, k, s, d]): every dot of the forward and backward then has its
    # batch axes leading and (g, t) in one order, so XLA moves q, k, v once instead of the [.., T, T] scores
    q, k, v = q.transpose(0, 2, 3, 1, 4), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    cap = None if logit_softcap is None else float(logit_softcap)
    return _attention(q, k, v, mask, float(scale), cap).transpose(0, 3, 1, 2, 4)


def _dot(spec, x, y):
    return jnp.einsum(spec, x, y, preferred_element_type=_F32)


def _probabilities(q, k, mask, scale, cap):
    """float32 p [b, k, g, t, s] and tanh(s / cap) (None without a cap)."""
    s = _dot("bkgtd,bksd->bkgts", q, k).astype(q.dtype) * jnp.asarray(scale, q.dtype)
    s = s.astype(_F32)
    tanh = None
    if cap is not None:
        tanh = jnp.tanh(s / cap)
        s = cap * tanh
    return jax.nn.softmax(jnp.where(mask, s, _MIN), axis=-1), tanh


def _transposed_product(x, p):
    """x [b, k, g, t, d], p [b, k, g, t, s] -> (x^T p)^T = p^T x [b, k, s, d] in float32.

    Computed as x^T p ([b, k, d, s]: p is contracted over its leading (g, t) axes, the layout a dot reads
    without copying it) and then transposed, which moves [s, d] instead of the [(g, t), s] probabilities. The
    barrier keeps XLA from folding the transpose back into the dot (it would then copy p again; in bfloat16
    that dot also lost its native kernel: "Unsupported element type for DotThunk")."""
    return jnp.swapaxes(jax.lax.optimization_barrier(_dot("bkgtd,bkgts->bkds", x, p)), -1, -2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, mask, scale, cap):
    """q [b, k, g, t, d], k and v [b, k, s, d], mask bool [b, 1, 1, t, s] -> out [b, k, g, t, d]."""
    return _attention_fwd(q, k, v, mask, scale, cap)[0]


def _attention_fwd(q, k, v, mask, scale, cap):
    p, tanh = _probabilities(q, k, mask, scale, cap)
    p = p.astype(q.dtype)
    out = _dot("bkgts,bksd->bkgtd", p, v.astype(q.dtype)).astype(q.dtype)
    return out, (q, k, v, p, tanh)


def _attention_bwd(scale, cap, residuals, dout):
    q, k, v, p, tanh = residuals
    dt = q.dtype
    dout = dout.astype(dt)
    dv = _transposed_product(dout, p).astype(v.dtype)
    dp = _dot("bkgtd,bksd->bkgts", dout, v.astype(dt)).astype(dt).astype(_F32)
    p = p.astype(_F32)
    ds = p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True))  # masked keys: p = 0, so ds = 0
    if tanh is not None:
        ds = ds * (1.0 - tanh * tanh)
    ds = ds.astype(dt) * jnp.asarray(scale, dt)
    dq = _dot("bkgts,bksd->bkgtd", ds, k.astype(dt)).astype(dt)
    dk = _transposed_product(q, ds).astype(k.dtype)
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)
