"""Which keys a query sees: causal, inside its packed segment, and inside the sliding window if any.

    visible(q, k) = k <= q  and  segment[q] == segment[k]  and  (window is None or q - k < window)

Positions are indices in the row (packed examples restart their rotary positions, not these).

Gemma 2's logit soft cap bends the scaled scores before the mask: softcap(s) = cap * tanh(s / cap).
"""
from __future__ import annotations

import jax.numpy as jnp


def visible(q_idx: jnp.ndarray, k_idx: jnp.ndarray, q_seg: jnp.ndarray, k_seg: jnp.ndarray,
            sliding_window: int | None) -> jnp.ndarray:
    """bool [batch, q, k] for query indices [q] and key indices [k], segment ids [batch, q] and [batch, k]
    ([q, k] for segment ids [q] and [k]: one row, as a kernel body sees it)."""
    mask = k_idx[None, :] <= q_idx[:, None]
    if sliding_window is not None:
        mask = mask & (q_idx[:, None] - k_idx[None, :] < sliding_window)
    return mask & (q_seg[..., :, None] == k_seg[..., None, :])


def attention_mask(segment_ids: jnp.ndarray, sliding_window: int | None) -> jnp.ndarray:
    """bool [batch, 1, 1, q, k] over the whole row: what the reference path materializes."""
    idx = jnp.arange(segment_ids.shape[1])
    return visible(idx, idx, segment_ids, segment_ids, sliding_window)[:, None, None]


def softcap(scores: jnp.ndarray, cap: float | None) -> jnp.ndarray:
    """cap * tanh(scores / cap), or the scores unchanged when cap is None (d/ds = 1 - tanh^2)."""
    if cap is None:
        return scores
    return cap * jnp.tanh(scores / cap)


def check_softcap(cap: float | None) -> None:
    if cap is not None and not cap > 0:
        raise ValueError(f"logit_softcap must be > 0 or None, got {cap}")


def check_inputs(name: str, q, k, v, segment_ids, *, sliding_window: int | None, logit_softcap: float | None) -> None:
    """ValueError naming backend `name` unless q [b, t, kv_heads, group, d], k = v [b, t, kv_heads, d],
    segment_ids [b, t], sliding_window >= 1 or None and logit_softcap > 0 or None."""
    b, t, kv, _, d = q.shape
    if k.shape != (b, t, kv, d) or v.shape != k.shape:
        raise ValueError(f"{name}: k and v must be [batch, seq, kv_heads, head_dim] = {(b, t, kv, d)} "
                         f"to match q {q.shape}, got k {k.shape}, v {v.shape}")
    if segment_ids.shape != (b, t):
        raise ValueError(f"{name}: segment_ids must be [batch, seq] = {(b, t)}, got {segment_ids.shape}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    check_softcap(logit_softcap)
