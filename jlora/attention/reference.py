"""The materialized attention: every score of the row at once. The path all others are tested against.

    s = q k^T * scale;  s = cap * tanh(s / cap) when logit_softcap=cap (Gemma 2);  out = softmax(s + mask) v
    scores [batch, kv_heads, group, T, T] in float32 (the cap is applied after scaling, before masking,
    as transformers' Gemma 2 eager attention does)

Memory O(T^2) per layer (kept for the backward): fine for short rows, the reference everywhere.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jlora.attention.masks import attention_mask, check_softcap, softcap
from jlora.kernels.mixed_dot import einsum as mixed_einsum


def reference_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, segment_ids: jnp.ndarray, *,
                        sliding_window: int | None = None, scale: float,
                        logit_softcap: float | None = None) -> jnp.ndarray:
    """q [b, t, kv_heads, group, d], k and v [b, t, kv_heads, d], segment_ids [b, t] -> [b, t, kv_heads, group, d]."""
    check_softcap(logit_softcap)
    dtype = q.dtype
    mask = attention_mask(segment_ids, sliding_window)
    # head-major operands ([b, k, g, t, d], [b, k, s, d]): every dot of the forward and backward then has its
    # batch axes leading and (g, t) in one order, so XLA moves q, k, v once instead of the [.., T, T] scores
    q, k, v = q.transpose(0, 2, 3, 1, 4), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    scores = mixed_einsum("bkgtd,bksd->bkgts", q, k) * jnp.asarray(scale, dtype)
    scores = softcap(scores.astype(jnp.float32), logit_softcap)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    return mixed_einsum("bkgts,bksd->bkgtd", probs, v).transpose(0, 3, 1, 2, 4)
