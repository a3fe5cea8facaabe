"""Blockwise (flash-style) attention in plain JAX: never more than one [q-block, k-block] of scores.

Forward, per query block i, over the key blocks j it can see (online softmax, Milakov & Gimelshein
2018; FlashAttention, arXiv 2205.14135):

    s   = q_i k_j^T * scale  (float32; then cap * tanh(s / cap) under a logit soft cap; then masked)
                                                     m' = max(m, rowmax s)
    p   = exp(s - m')                                l' = exp(m - m') l + rowsum p
    acc = exp(m - m') acc + p v_j                    out_i = acc / l,  lse_i = m + log l

Backward (a custom_vjp; FlashAttention-2, arXiv 2307.08691), per key block j over the query blocks
that see it, recomputing p from the saved log-sum-exp instead of storing probabilities:

    p = exp(s - lse_i),  D_i = rowsum(dout_i * out_i),  ds = p * (dout_i v_j^T - D_i)
    (soft cap: ds *= 1 - tanh^2(s_raw / cap), the derivative of cap * tanh(s_raw / cap))
    dv_j += p^T dout_i,  dk_j += ds^T q_i * scale,  dq_i += ds k_j * scale

Only blocks that hold a visible key are visited: causal rows stop at the diagonal block, a sliding
window starts at the block of its first key, so the work is about half of T^2 (causal) or T x window;
inside that range a block pair where no query sees a key (two packed segments) is skipped by a cond.
Saved for the backward: q, k, v, out and lse [b, kv_heads, group, T]; temporaries are O(block_q x
block_k) per head. Memory O(T) instead of O(T^2).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from jlora.attention.masks import check_inputs, visible

_MIN = float(jnp.finfo(jnp.float32).min)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Query and key positions per block (each is capped at the sequence length). The default is the
    fastest measured on CPU at T 2048 (128 and 256 equal, 512 1.25x slower, 1024 2.6x slower)."""
    q: int = 256
    k: int = 256

    def __post_init__(self):
        if self.q < 1 or self.k < 1:
            raise ValueError(f"attention block sizes must be >= 1, got q={self.q}, k={self.k}")

    @classmethod
    def get_default(cls) -> "BlockSizes":
        return cls()


def blockwise_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, segment_ids: jnp.ndarray, *,
                        sliding_window: int | None = None, scale: float,
                        block_sizes: BlockSizes | None = None, logit_softcap: float | None = None) -> jnp.ndarray:
    """q [b, t, kv_heads, group, d], k and v [b, t, kv_heads, d], segment_ids [b, t] -> [b, t, kv_heads, group, d].

    Causal, within equal segment ids, and within `sliding_window` positions when given; the same
    function as jlora.attention.reference_attention (`logit_softcap` too). The row is padded to a multiple of the blocks
    (padded keys are never visible to real queries: they come after them).
    """
    b, t, kv, g, d = q.shape
    check_inputs("blockwise_attention", q, k, v, segment_ids, sliding_window=sliding_window,
                 logit_softcap=logit_softcap)
    blocks = block_sizes or BlockSizes.get_default()
    bq, bk = min(blocks.q, t), min(blocks.k, t)
    step = bq * bk // math.gcd(bq, bk)
    pad = (-t) % step
    seg = segment_ids.astype(jnp.int32)
    if pad:
        q, k, v = (jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2)) for a in (q, k, v))
        seg = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=-1)
    cap = None if logit_softcap is None else float(logit_softcap)
    # head-major inside ([b, kv, g, t, d] queries, [b, kv, s, d] keys/values): every block dot of the forward and
    # backward has its batch axes leading and one (g, q) order, so XLA transposes q, k, v once per call instead
    # of each block's scores
    q, k, v = q.transpose(0, 2, 3, 1, 4), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    out = _flash(q, k, v, seg, sliding_window, float(scale), bq, bk, cap)
    return out.transpose(0, 3, 1, 2, 4)[:, :t]


def key_blocks(i, bq, bk, nk, window):
    """Key blocks [lo, hi) that query block i can see (also jlora.attention.flash's kernels')."""
    hi = jnp.minimum(nk, ((i + 1) * bq - 1) // bk + 1)
    lo = 0 if window is None else jnp.maximum(0, (i * bq - window + 1) // bk)
    return lo, hi


def query_blocks(j, bq, bk, nq, window):
    """Query blocks [lo, hi) that see key block j (also jlora.attention.flash's kernels')."""
    lo = (j * bk) // bq
    hi = nq if window is None else jnp.minimum(nq, ((j + 1) * bk + window - 2) // bq + 1)
    return lo, hi


def _block(a, i, size, axis=1):
    """Block i of `size` positions along `axis` (1: segment ids [b, t]; 2: keys/values [b, kv, s, d]; 3: queries
    [b, kv, g, t, d])."""
    return jax.lax.dynamic_slice_in_dim(a, i * size, size, axis=axis)


def _mask(seg_q, seg_k, i, j, bq, bk, window):
    """bool [b, 1, 1, bq, bk]: which keys of block j the queries of block i see."""
    return visible(i * bq + jnp.arange(bq), j * bk + jnp.arange(bk), seg_q, seg_k, window)[:, None, None]


def _scores(q_i, k_j, mask, scale, cap):
    """Masked float32 scores [b, kv, g, bq, bk] and tanh(s / cap) (None without a cap) for the backward."""
    s = jnp.einsum("bkgqd,bksd->bkgqs", q_i, k_j, preferred_element_type=jnp.float32) * scale
    tanh = None
    if cap is not None:
        tanh = jnp.tanh(s / cap)
        s = cap * tanh
    return jnp.where(mask, s, _MIN), tanh


def _if_visible(mask, update, carry):
    """update(carry) when any query of the block pair sees any key (in any row), else carry unchanged:
    block pairs that lie between two packed segments cost nothing."""
    return jax.lax.cond(jnp.any(mask), update, lambda c: c, carry)


def _forward(q, k, v, seg, window, scale, bq, bk, cap):
    """q [b, kv, g, t, d], k and v [b, kv, t, d] -> out like q, log-sum-exp [b, kv, g, t]."""
    b, kv, g, t, d = q.shape
    nq, nk = t // bq, t // bk

    def q_block(i):
        q_i, seg_q = _block(q, i, bq, 3), _block(seg, i, bq)

        def body(j, carry):
            mask = _mask(seg_q, _block(seg, j, bk), i, j, bq, bk, window)

            def update(carry):
                m, l, acc = carry
                k_j, v_j = _block(k, j, bk, 2), _block(v, j, bk, 2)
                s, _ = _scores(q_i, k_j, mask, scale, cap)
                m_new = jnp.maximum(m, s.max(-1))
                alpha = jnp.exp(m - m_new)
                p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
                pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(v.dtype), v_j, preferred_element_type=jnp.float32)
                return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

            return _if_visible(mask, update, carry)

        init = (jnp.full((b, kv, g, bq), _MIN, jnp.float32), jnp.zeros((b, kv, g, bq), jnp.float32),
                jnp.zeros((b, kv, g, bq, d), jnp.float32))
        lo, hi = key_blocks(i, bq, bk, nk, window)
        m, l, acc = jax.lax.fori_loop(lo, hi, body, init)
        l = jnp.maximum(l, jnp.finfo(jnp.float32).tiny)  # every row sees its own key: l >= 1
        out = (acc / l[..., None]).astype(q.dtype)
        return out, m + jnp.log(l)                           # [b, kv, g, bq, d], [b, kv, g, bq]

    out, lse = jax.lax.map(q_block, jnp.arange(nq))          # [nq, b, kv, g, bq, d], [nq, b, kv, g, bq]
    out = jnp.moveaxis(out, 0, 3).reshape(b, kv, g, t, d)
    lse = jnp.moveaxis(lse, 0, 3).reshape(b, kv, g, t)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _flash(q, k, v, seg, window, scale, bq, bk, cap):
    return _forward(q, k, v, seg, window, scale, bq, bk, cap)[0]


def _flash_fwd(q, k, v, seg, window, scale, bq, bk, cap):
    out, lse = _forward(q, k, v, seg, window, scale, bq, bk, cap)
    return out, (q, k, v, seg, out, lse)


def _flash_bwd(window, scale, bq, bk, cap, res, dout):
    q, k, v, seg, out, lse = res
    b, kv, g, t, d = q.shape
    nq, nk = t // bq, t // bk
    dout = dout.astype(q.dtype)
    delta = jnp.einsum("bkgqd,bkgqd->bkgq", dout.astype(jnp.float32), out.astype(jnp.float32))

    def k_block(j, carry):
        dq, dk, dv = carry
        k_j, v_j, seg_k = _block(k, j, bk, 2), _block(v, j, bk, 2), _block(seg, j, bk)

        def body(i, inner):
            mask = _mask(_block(seg, i, bq), seg_k, i, j, bq, bk, window)

            def update(inner):
                dq, dk_j, dv_j = inner
                q_i, do_i = _block(q, i, bq, 3), _block(dout, i, bq, 3)
                lse_i = jax.lax.dynamic_slice_in_dim(lse, i * bq, bq, axis=3)
                delta_i = jax.lax.dynamic_slice_in_dim(delta, i * bq, bq, axis=3)
                s, tanh = _scores(q_i, k_j, mask, scale, cap)
                p = jnp.where(mask, jnp.exp(s - lse_i[..., None]), 0.0)
                dv_j = dv_j + jnp.einsum("bkgqs,bkgqd->bksd", p.astype(q.dtype), do_i,
                                         preferred_element_type=jnp.float32)
                dp = jnp.einsum("bkgqd,bksd->bkgqs", do_i, v_j, preferred_element_type=jnp.float32)
                ds = p * (dp - delta_i[..., None])
                if tanh is not None:
                    ds = ds * (1.0 - tanh * tanh)
                ds = (ds * scale).astype(q.dtype)
                dq_i = jnp.einsum("bkgqs,bksd->bkgqd", ds, k_j, preferred_element_type=jnp.float32)
                dq = jax.lax.dynamic_update_slice_in_dim(dq, _block(dq, i, bq, 3) + dq_i, i * bq, axis=3)
                dk_j = dk_j + jnp.einsum("bkgqs,bkgqd->bksd", ds, q_i, preferred_element_type=jnp.float32)
                return dq, dk_j, dv_j

            return _if_visible(mask, update, inner)

        zeros = jnp.zeros((b, kv, bk, d), jnp.float32)
        lo, hi = query_blocks(j, bq, bk, nq, window)
        dq, dk_j, dv_j = jax.lax.fori_loop(lo, hi, body, (dq, zeros, zeros))
        dk = jax.lax.dynamic_update_slice_in_dim(dk, dk_j, j * bk, axis=2)
        dv = jax.lax.dynamic_update_slice_in_dim(dv, dv_j, j * bk, axis=2)
        return dq, dk, dv

    init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dq, dk, dv = jax.lax.fori_loop(0, nk, k_block, init)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_flash.defvjp(_flash_fwd, _flash_bwd)
