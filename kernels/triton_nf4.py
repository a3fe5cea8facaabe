"""Triton GPU kernel for the NF4 LoRA matmul (dequant in the tile), via jax-triton.

    forward  (TRANSPOSE_W=False):  out = lhs @ W.T + lo @ lo_rhs   lhs = x [M, K], out [M, N]
    dx       (TRANSPOSE_W=True):   out = lhs @ W   + lo @ lo_rhs   lhs = dy [M, N], out [M, K]

W [N, K] is bitsandbytes' NF4 layout: weight ``f = n * K + k`` of the flattened
matrix is nibble ``f % 2`` of byte ``f // 2`` of ``codes`` (the even one in the
high nibble), scaled by ``absmax[f // BLOCKSIZE]`` (float32, double
quantization decoded by the caller). Each program builds its [BLOCK_C,
BLOCK_N] tile of W (or W.T) in registers from the packed bytes: byte load,
shift and mask, a load from the 16-entry code table (it stays in L1), times
absmax, cast to the input dtype, then ``tl.dot`` with fp32 accumulation, and
the rank-r product as an epilogue like triton_lora.py. A full W never exists
in global memory.

Each byte is loaded by the two lanes that use it (the cache serves the second),
which keeps the tile code one expression for both orientations; a
byte-tile-then-``tl.interleave`` variant would halve the load instructions.

Imports triton at the top: only imported lazily (nf4_vjp.py) or by tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl

from jlora.kernels.block_sizes import BlockSizes
from jlora.kernels.triton_lora import launch_config
from jlora.kernels.triton_lora import precision
from jlora.kernels.triton_lora import rank_block
from jlora.nf4.codebook import NF4_CODE


@triton.jit
def nf4_matmul_kernel(
        lhs_ptr, codes_ptr, absmax_ptr, code_ptr, lo_ptr, lo_rhs_ptr,
        m, n_out, c, r, k_w,
        stride_lhs_m, stride_lhs_c, stride_lo_m, stride_lo_r,
        stride_lo_rhs_r, stride_lo_rhs_n, stride_out_m, stride_out_n,
        out_ptr,
        TRANSPOSE_W: tl.constexpr, BLOCKSIZE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
        BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    """out = lhs @ op(W) + lo @ lo_rhs with W dequantized per tile (module docstring).

    k_w is W's row length K; c the contraction (K forward, N for dx); n_out the
    output width (N forward, K for dx).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < m
    col_ok = cols < n_out
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c0 in range(0, c, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        c_ok = cc < c
        lhs = tl.load(lhs_ptr + rows[:, None] * stride_lhs_m + cc[None, :] * stride_lhs_c,
                      mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        if TRANSPOSE_W:  # tile[i, j] = W[cc[i], cols[j]]
            flat = cc[:, None].to(tl.int64) * k_w + cols[None, :]
        else:            # tile[i, j] = W[cols[j], cc[i]]
            flat = cols[None, :].to(tl.int64) * k_w + cc[:, None]
        ok = c_ok[:, None] & col_ok[None, :]
        byte = tl.load(codes_ptr + flat // 2, mask=ok, other=0).to(tl.int32)
        nibble = (byte >> (4 - 4 * (flat % 2)).to(tl.int32)) & 0xF
        scale = tl.load(absmax_ptr + flat // BLOCKSIZE, mask=ok, other=0.0)
        w = (tl.load(code_ptr + nibble) * scale).to(lhs.dtype)
        acc = tl.dot(lhs, w, acc, input_precision=PRECISION)
    for r0 in range(0, r, BLOCK_R):  # the low-rank epilogue
        rr = r0 + tl.arange(0, BLOCK_R)
        r_ok = rr < r
        lo = tl.load(lo_ptr + rows[:, None] * stride_lo_m + rr[None, :] * stride_lo_r,
                     mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        lo_rhs = tl.load(lo_rhs_ptr + rr[:, None] * stride_lo_rhs_r
                         + cols[None, :] * stride_lo_rhs_n,
                         mask=r_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(lo, lo_rhs, acc, input_precision=PRECISION)
    tl.store(out_ptr + rows[:, None] * stride_out_m + cols[None, :] * stride_out_n,
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def nf4_matmul_triton(lhs, codes, absmax, lo, lo_rhs, *, shape: tuple[int, int],
                      blocksize: int, transpose_w: bool, block_sizes: BlockSizes):
    """``lhs @ W.T + lo @ lo_rhs`` (or ``lhs @ W + ...``) through jax-triton.

    codes: flat uint8 [(N*K+1)//2]; absmax: float32 [ceil(N*K / blocksize)];
    lo: [M, r]; lo_rhs: [r, O] (row-major). Tiles: (block_m, block_n,
    block_k) forward, (block_m_dx, block_k_dx, block_n_dx) for dx.
    """
    import jax_triton  # pylint: disable=import-outside-toplevel
    n, k = shape
    m, c = lhs.shape
    r = lo.shape[1]
    o = k if transpose_w else n
    bs = block_sizes
    if transpose_w:
        bm, bo, bc = bs.block_m_dx, bs.block_k_dx, bs.block_n_dx
    else:
        bm, bo, bc = bs.block_m, bs.block_n, bs.block_k
    return jax_triton.triton_call(
        lhs, codes, absmax, jnp.asarray(NF4_CODE), lo, lo_rhs, m, o, c, r, k,
        c, 1, r, 1, o, 1, o, 1,
        kernel=nf4_matmul_kernel,
        out_shape=jax.ShapeDtypeStruct((m, o), lhs.dtype),
        grid=(triton.cdiv(m, bm), triton.cdiv(o, bo)),
        name="nf4_lora_dx" if transpose_w else "nf4_lora_fwd",
        TRANSPOSE_W=transpose_w, BLOCKSIZE=blocksize,
        BLOCK_M=bm, BLOCK_N=bo, BLOCK_C=bc, BLOCK_R=rank_block(r),
        PRECISION=precision(lhs.dtype), **launch_config(lhs.dtype))


def code_table_numpy() -> np.ndarray:
    """The float32 [16] NF4 table the kernel reads (for torch-side callers)."""
    return np.array(NF4_CODE, np.float32)
