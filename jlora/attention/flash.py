"""Pallas GPU flash attention for what cuDNN's call cannot express: packed segments, a logit soft cap, float32.

    out = softmax(softcap(q k^T * scale) + mask) v     mask: causal, same segment, q - k < window

The kernels are jlora's own, written after the approach of jax.experimental.pallas.ops.gpu.attention (the
Triton-lowered Pallas flash attention) with what that one lacks: grouped kv heads (query head h reads kv
head h // group through the BlockSpec index map, no repeated k/v), a sliding window (the key loop starts
at the window's first block), Gemma 2's soft cap, and segment ids for packing. Per query block i, over
the key blocks j it can see (online softmax; FlashAttention-2, arXiv 2307.08691):

    s = q_i k_j^T * scale (float32; cap * tanh(s / cap) under a cap; masked)
    m' = max(m, rowmax s),  p = exp(s - m'),  l' = exp(m - m') l + rowsum p,  acc' = exp(m - m') acc + p v_j
    out_i = acc / l,  lse_i = m + log l

Backward, two kernels that recompute p = exp(s - lse) instead of storing it, with D = rowsum(dout * out):
    dkv (grid over key blocks, per query head):  dv_j = sum_i p^T dout_i,  dk_j = sum_i ds^T q_i * scale
    dq  (grid over query blocks):                dq_i = sum_j ds k_j * scale,   ds = p (dout v^T - D) (1 - tanh^2)
dk and dv come out per query head (float32) and are summed over each kv head's group outside the kernel.

Rows are padded to a multiple of the block with segment id -1 (padded keys follow every real query, so
causality hides them), head_dim to a power of two with zeros (Triton's block shapes are powers of two).
Blocks: `BlockSizes(q, k)` (jlora.attention.BlockSizes), powers of two >= 16; default 64 x 64 (fits
head_dim 256 in shared memory; not tuned: no GPU was lent to this work).

Where it runs: on a CUDA GPU the Triton lowering; everywhere else Pallas interpret mode (`interpret=True`,
slow: for tests). What has been exercised (tests/long_context/test_flash.py): interpret mode against the
float64 reference (values and gradients; packed, window, soft cap, GQA, padded head_dim) and through a
whole model against transformers; the Pallas -> Triton lowering of all three kernels for CUDA, done on a
CPU host (`lowering_platforms=("cuda",)`). Compiling that Triton IR and running it needs a GPU, which this
work did not have: the GPU tests skip without one, and block sizes / warps are untuned.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jlora.attention.blockwise import BlockSizes, key_blocks, query_blocks
from jlora.attention.masks import check_inputs, visible

DEFAULT_BLOCK = 64
_MIN = float(jnp.finfo(jnp.float32).min)


def flash_block(seq_len: int, block_sizes: BlockSizes | None = None) -> int:
    """The one block size (queries and keys) for a row of `seq_len`: block_sizes.q (== .k), or DEFAULT_BLOCK,
    capped at seq_len rounded up to a power of two (>= 16)."""
    if block_sizes is not None and block_sizes.q != block_sizes.k:
        raise ValueError(f"flash attention: block sizes must be equal, got q={block_sizes.q}, k={block_sizes.k}")
    block = DEFAULT_BLOCK if block_sizes is None else block_sizes.q
    if block < 16 or block & (block - 1):
        raise ValueError(f"flash attention: block size must be a power of two >= 16, got {block}")
    return min(block, max(16, pl.next_power_of_2(seq_len)))


def flash_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, segment_ids: jnp.ndarray, *,
                    sliding_window: int | None = None, scale: float, logit_softcap: float | None = None,
                    block_sizes: BlockSizes | None = None, interpret: bool | None = None) -> jnp.ndarray:
    """q [b, t, kv_heads, group, d], k and v [b, t, kv_heads, d], segment_ids [b, t] -> [b, t, kv_heads, group, d].

    The same function as jlora.attention.reference_attention, by the Pallas kernels (module docstring).
    `interpret`: None runs the Triton lowering on a GPU and interpret mode elsewhere."""
    b, t, kv, g, d = q.shape
    check_inputs("flash_attention", q, k, v, segment_ids, sliding_window=sliding_window,
                 logit_softcap=logit_softcap)
    block = flash_block(t, block_sizes)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    tp, dp = -(-t // block) * block, pl.next_power_of_2(d)
    seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, tp - t)), constant_values=-1)
    pad = ((0, 0), (0, 0), (0, tp - t), (0, dp - d))
    qh = jnp.pad(jnp.moveaxis(q.reshape(b, t, kv * g, d), 1, 2), pad)          # [b, heads, tp, dp]
    kh, vh = (jnp.pad(jnp.moveaxis(a, 1, 2), pad) for a in (k, v))            # [b, kv, tp, dp]
    cap = None if logit_softcap is None else float(logit_softcap)
    static = _Static(group=g, block=block, window=sliding_window, scale=float(scale), cap=cap,
                     interpret=bool(interpret))
    out = _flash(qh, kh, vh, seg, static)
    return jnp.moveaxis(out[:, :, :t, :d], 1, 2).reshape(b, t, kv, g, d)


class _Static(tuple):
    """The hashable static arguments of the custom_vjp (group, block, window, scale, cap, interpret)."""

    def __new__(cls, *, group, block, window, scale, cap, interpret):
        return super().__new__(cls, (group, block, window, scale, cap, interpret))

    group = property(lambda self: self[0])
    block = property(lambda self: self[1])
    window = property(lambda self: self[2])
    scale = property(lambda self: self[3])
    cap = property(lambda self: self[4])
    interpret = property(lambda self: self[5])


def _scores(q, k, q_pos, k_pos, seg_q, seg_k, st: _Static):
    """Masked float32 scores [bq, bk], tanh(s / cap) (None without a cap) and the mask."""
    s = pl.dot(q, k, trans_b=True) * st.scale
    tanh = None
    if st.cap is not None:
        tanh = jnp.tanh(s / st.cap)
        s = st.cap * tanh
    mask = visible(q_pos, k_pos, seg_q, seg_k, st.window)
    return jnp.where(mask, s, _MIN), tanh, mask


def _forward_kernel(q_ref, k_ref, v_ref, segq_ref, segk_ref, o_ref, lse_ref, *, st: _Static):
    i, bs = pl.program_id(2), st.block
    nk = k_ref.shape[0] // bs
    q, seg_q = q_ref[...], segq_ref[...]
    q_pos = i * bs + jnp.arange(bs)

    def body(j, carry):
        acc, m, l = carry
        keys = pl.ds(j * bs, bs)
        s, _, mask = _scores(q, k_ref[keys, :], q_pos, j * bs + jnp.arange(bs), seg_q, segk_ref[keys], st)
        m_new = jnp.maximum(m, s.max(axis=-1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
        v = v_ref[keys, :]
        acc = alpha[:, None] * acc + pl.dot(p.astype(v.dtype), v)
        return acc, m_new, alpha * l + p.sum(axis=-1)

    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((bs,), _MIN, jnp.float32), jnp.zeros((bs,), jnp.float32))
    lo, hi = key_blocks(i, st.block, st.block, nk, st.window)
    acc, m, l = lax.fori_loop(lo, hi, body, init)
    l = jnp.maximum(l, jnp.finfo(jnp.float32).tiny)  # every row sees its own key: l >= 1
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _compiler_params(st: _Static, dp: int):
    if st.interpret:
        return None
    from jax.experimental.pallas import triton as plgpu  # pylint: disable=import-outside-toplevel
    return plgpu.CompilerParams(num_warps=4 if dp <= 64 else 8, num_stages=2)


def _forward(qh, kh, vh, seg, st: _Static):
    b, heads, tp, dp = qh.shape
    bs, g = st.block, st.group
    block_q = pl.BlockSpec((None, None, bs, dp), lambda bi, h, i: (bi, h, i, 0))
    whole_kv = pl.BlockSpec((None, None, tp, dp), lambda bi, h, i: (bi, h // g, 0, 0))
    return pl.pallas_call(
        functools.partial(_forward_kernel, st=st),
        grid=(b, heads, tp // bs),
        in_specs=[block_q, whole_kv, whole_kv, pl.BlockSpec((None, bs), lambda bi, h, i: (bi, i)),
                  pl.BlockSpec((None, tp), lambda bi, h, i: (bi, 0))],
        out_specs=[block_q, pl.BlockSpec((None, None, bs), lambda bi, h, i: (bi, h, i))],
        out_shape=[jax.ShapeDtypeStruct(qh.shape, qh.dtype), jax.ShapeDtypeStruct((b, heads, tp), jnp.float32)],
        compiler_params=_compiler_params(st, dp), interpret=st.interpret, name="jlora_flash_forward",
    )(qh, kh, vh, seg, seg)


def _dkv_kernel(q_ref, do_ref, lse_ref, delta_ref, segq_ref, k_ref, v_ref, segk_ref, dk_ref, dv_ref, *,
                st: _Static):
    j, bs = pl.program_id(2), st.block
    nq = q_ref.shape[0] // bs
    k, v, seg_k = k_ref[...], v_ref[...], segk_ref[...]
    k_pos = j * bs + jnp.arange(bs)

    def body(i, carry):
        dk, dv = carry
        rows = pl.ds(i * bs, bs)
        q, do = q_ref[rows, :], do_ref[rows, :]
        s, tanh, mask = _scores(q, k, i * bs + jnp.arange(bs), k_pos, segq_ref[rows], seg_k, st)
        p = jnp.where(mask, jnp.exp(s - lse_ref[rows][:, None]), 0.0)
        dv = dv + pl.dot(p.astype(do.dtype), do, trans_a=True)
        ds = p * (pl.dot(do, v, trans_b=True) - delta_ref[rows][:, None])
        if tanh is not None:
            ds = ds * (1.0 - tanh * tanh)
        dk = dk + pl.dot((ds * st.scale).astype(q.dtype), q, trans_a=True)
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    lo, hi = query_blocks(j, st.block, st.block, nq, st.window)
    dk, dv = lax.fori_loop(lo, hi, body, (zeros, zeros))
    dk_ref[...], dv_ref[...] = dk, dv


def _dq_kernel(q_ref, do_ref, lse_ref, delta_ref, segq_ref, k_ref, v_ref, segk_ref, dq_ref, *, st: _Static):
    i, bs = pl.program_id(2), st.block
    nk = k_ref.shape[0] // bs
    q, do, lse, delta, seg_q = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...], segq_ref[...]
    q_pos = i * bs + jnp.arange(bs)

    def body(j, dq):
        keys = pl.ds(j * bs, bs)
        k = k_ref[keys, :]
        s, tanh, mask = _scores(q, k, q_pos, j * bs + jnp.arange(bs), seg_q, segk_ref[keys], st)
        p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
        ds = p * (pl.dot(do, v_ref[keys, :], trans_b=True) - delta[:, None])
        if tanh is not None:
            ds = ds * (1.0 - tanh * tanh)
        return dq + pl.dot((ds * st.scale).astype(k.dtype), k)

    lo, hi = key_blocks(i, st.block, st.block, nk, st.window)
    dq_ref[...] = lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32)).astype(dq_ref.dtype)


def _backward(qh, kh, vh, seg, out, lse, dout, st: _Static):
    b, heads, tp, dp = qh.shape
    bs, g, kv = st.block, st.group, kh.shape[1]
    delta = jnp.einsum("bhtd,bhtd->bht", dout.astype(jnp.float32), out.astype(jnp.float32))
    whole_q = pl.BlockSpec((None, None, tp, dp), lambda bi, h, x: (bi, h, 0, 0))
    whole_row = pl.BlockSpec((None, None, tp), lambda bi, h, x: (bi, h, 0))
    block_q = pl.BlockSpec((None, None, bs, dp), lambda bi, h, x: (bi, h, x, 0))
    block_row = pl.BlockSpec((None, None, bs), lambda bi, h, x: (bi, h, x))
    block_kv = pl.BlockSpec((None, None, bs, dp), lambda bi, h, x: (bi, h // g, x, 0))
    whole_kv = pl.BlockSpec((None, None, tp, dp), lambda bi, h, x: (bi, h // g, 0, 0))
    seg_block = pl.BlockSpec((None, bs), lambda bi, h, x: (bi, x))
    seg_whole = pl.BlockSpec((None, tp), lambda bi, h, x: (bi, 0))
    common = dict(grid=(b, heads, tp // bs), compiler_params=_compiler_params(st, dp), interpret=st.interpret)
    per_head = jax.ShapeDtypeStruct((b, heads, tp, dp), jnp.float32)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, st=st),
        in_specs=[whole_q, whole_q, whole_row, whole_row, seg_whole, block_kv, block_kv, seg_block],
        out_specs=[block_q, block_q], out_shape=[per_head, per_head], name="jlora_flash_dkv", **common,
    )(qh, dout, lse, delta, seg, kh, vh, seg)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, st=st),
        in_specs=[block_q, block_q, block_row, block_row, seg_block, whole_kv, whole_kv, seg_whole],
        out_specs=block_q, out_shape=jax.ShapeDtypeStruct(qh.shape, qh.dtype), name="jlora_flash_dq", **common,
    )(qh, dout, lse, delta, seg, kh, vh, seg)
    dk, dv = (a.reshape(b, kv, g, tp, dp).sum(axis=2) for a in (dk, dv))  # each kv head's group of query heads
    return dq, dk.astype(kh.dtype), dv.astype(vh.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(qh, kh, vh, seg, st: _Static):
    return _forward(qh, kh, vh, seg, st)[0]


def _flash_fwd(qh, kh, vh, seg, st):
    out, lse = _forward(qh, kh, vh, seg, st)
    return out, (qh, kh, vh, seg, out, lse)


def _flash_bwd(st, res, dout):
    qh, kh, vh, seg, out, lse = res
    dq, dk, dv = _backward(qh, kh, vh, seg, out, lse, dout.astype(qh.dtype), st)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)
