"""Cross-entropy over the output head in sequence chunks: `[tokens, vocab]` logits never exist at once.

    sum_t mask_t * CE_t,   CE_t = logsumexp_v(z_tv) - z_t,target_t,   z_t = head(h_t)  (float32)

The rows' positions are cut into chunks of `c` positions (`c * rows` about `chunk_tokens`); a
`lax.scan` runs the head and the log-sum-exp on one chunk at a time. Under differentiation a
`custom_vjp` forms each chunk's input gradient in the same pass (Liger/Unsloth style):

    dL/dz_t = mask_t * (softmax(z_t) - onehot(target_t)),   dL/dh_t = vjp of head at h_t, applied to dL/dz_t

and the backward only scales the stacked dL/dh by the incoming cotangent. So one chunk's `[rows, c,
vocab]` logits (and their gradient) exist at a time, nothing of size vocab is saved for the backward,
and no logits are recomputed: memory O(T * hidden + chunk_tokens * vocab) instead of O(T * vocab), at
the FLOPs of the plain computation. Chunks run along the sequence axis, so rows keep their sharding
over (data, fsdp) and the vocabulary its sharding over tensor.

The head's own weights are frozen unless passed as `head_params` (a trained embedding or head copy, trained
token rows: jlora/trainable_tokens.py): then `head(head_params, h)` and each chunk's vjp also gives
dL/dhead_params, summed over the chunks in float32. Differentiating with respect to weights the head closes
over is an error from JAX's custom_vjp, not a silent zero.

When the whole sequence fits in one chunk (every short run: the demo, the tests) this is the plain
computation, no scan and no recompute, so small runs pay nothing for it.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

DEFAULT_CHUNK_TOKENS = 2048  # logits of 2048 tokens at vocab 128,256 in float32: 1 GiB


def _ce_sum(logits: jnp.ndarray, targets: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """sum of mask * (logsumexp(z) - z[target]) in float32; masked positions contribute exact zeros
    (even when their target is out of range)."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.sum(jnp.where(mask > 0, (lse - picked) * mask, 0.0))


def chunk_positions(rows: int, seq_len: int, chunk_tokens: int) -> int:
    """Positions per chunk: chunk_tokens spread over the rows, at least 1, at most the sequence."""
    return max(1, min(seq_len, chunk_tokens // max(rows, 1)))


def chunked_cross_entropy_sum(head: Callable[..., jnp.ndarray], h: jnp.ndarray, targets: jnp.ndarray,
                              mask: jnp.ndarray, *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                              head_params=None) -> jnp.ndarray:
    """sum_t mask_t * CE(head(h_t), target_t) in float32, with head's logits computed chunk by chunk.

    head: hidden [rows, c, hidden] -> logits [rows, c, vocab] (the tied embedding or lm_head; frozen), or with
    `head_params` (a pytree of the head's trained weights) head(head_params, hidden), differentiable in both.
    h [rows, T, hidden]; targets, mask [rows, T]. chunk_tokens: about how many tokens' logits exist at once (>= 1).
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1 (tokens whose logits exist at once), got {chunk_tokens}")
    if head_params is None:
        frozen_head = head
        head = lambda _, h: frozen_head(h)
        head_params = ()
    rows, t = targets.shape
    mask = mask.astype(jnp.float32)
    c = chunk_positions(rows, t, chunk_tokens)
    if c >= t:
        return _ce_sum(head(head_params, h), targets, mask)
    pad = (-t) % c
    if pad:  # padded positions have mask 0: they add exact zeros
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        targets, mask = (jnp.pad(a, ((0, 0), (0, pad))) for a in (targets, mask))
    n = (t + pad) // c

    def chunks(a):  # [rows, n * c, ...] -> [n, rows, c, ...]
        return jnp.moveaxis(a.reshape(rows, n, c, *a.shape[2:]), 1, 0)

    return _scanned_ce(head, head_params, chunks(h), chunks(targets), chunks(mask))


def _scanned_ce(head, params, hs, ts, ms):
    """sum over chunks of _ce_sum(head(params, hs[i]), ts[i], ms[i]), with the gradients of hs and params
    formed in the forward (those of params summed over the chunks in float32)."""

    @jax.custom_vjp
    def total(params, hs, ts, ms):
        def body(acc, xs):
            h_c, t_c, m_c = xs
            return acc + _ce_sum(head(params, h_c), t_c, m_c), None
        return jax.lax.scan(body, jnp.zeros((), jnp.float32), (hs, ts, ms))[0]

    def fwd(params, hs, ts, ms):
        def body(carry, xs):
            acc, dparams = carry
            h_c, t_c, m_c = xs
            logits, head_vjp = jax.vjp(head, params, h_c)
            z = logits.astype(jnp.float32)
            lse = jax.nn.logsumexp(z, axis=-1)
            picked = jnp.take_along_axis(z, t_c[..., None].astype(jnp.int32), axis=-1)[..., 0]
            weight = jnp.where(m_c > 0, m_c, 0.0)
            loss = jnp.sum(jnp.where(m_c > 0, (lse - picked) * m_c, 0.0))
            onehot = jax.nn.one_hot(t_c, z.shape[-1], dtype=jnp.float32)
            dz = (jnp.exp(z - lse[..., None]) - onehot) * weight[..., None]
            dp, dh = head_vjp(dz.astype(logits.dtype))
            dparams = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), dparams, dp)
            return (acc + loss, dparams), dh
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        (value, dparams), dhs = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), (hs, ts, ms))
        return value, (dparams, dhs)

    def bwd(res, g):  # scaled in float32: a bf16 copy of g (e.g. 1 / target tokens) would bias every entry alike
        dparams, dhs = res
        dparams = jax.tree.map(lambda d, p: (d * g).astype(p.dtype), dparams, params)
        return (dparams, (dhs.astype(jnp.float32) * g).astype(dhs.dtype), None, None)

    total.defvjp(fwd, bwd)
    return total(params, hs, ts, ms)
