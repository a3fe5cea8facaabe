"""Triton GPU kernel for the fused LoRA matmul, called from JAX through jax-triton.

    out = lhs @ rhs + lo @ lo_rhs

Every operand is addressed through its strides, so a transposed operand is the
same buffer with its strides swapped and one kernel serves both LoRA passes:

    forward  y  = x  @ w   + xa @ b        rhs = w [K, N],   lo_rhs = b [r, N]
    dx       dx = dy @ w.T + g  @ a.T      rhs = w read as [N, K] (strides (1, N)),
                                           lo_rhs = a read as [r, K] (strides (1, r))

One program computes a [BLOCK_M, BLOCK_N] tile: an fp32 accumulator over the
contraction in BLOCK_C steps, then the rank-r product as an epilogue on the
same accumulator (BLOCK_R columns at a time), one store. Rows, columns and the
contraction are masked, so any shape runs. float32 inputs use IEEE fp32 dots
(not TF32) to match XLA and the Pallas kernel.

This module imports triton at the top: import it only when impl="triton" runs
(lora_vjp.py does so lazily). The kernel runs on torch CPU tensors under
Triton's interpreter (``TRITON_INTERPRET=1``), which is how tests check it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from jlora.kernels.block_sizes import BlockSizes


@triton.jit
def lora_matmul_kernel(
        lhs_ptr, rhs_ptr, lo_ptr, lo_rhs_ptr,
        m, n, c, r,
        stride_lhs_m, stride_lhs_c, stride_rhs_c, stride_rhs_n,
        stride_lo_m, stride_lo_r, stride_lo_rhs_r, stride_lo_rhs_n,
        stride_out_m, stride_out_n,
        out_ptr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
        BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    """out[m, n] = lhs[m, c] @ rhs[c, n] + lo[m, r] @ lo_rhs[r, n] (fp32 accumulation)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < m
    col_ok = cols < n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c0 in range(0, c, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        c_ok = cc < c
        lhs = tl.load(lhs_ptr + rows[:, None] * stride_lhs_m + cc[None, :] * stride_lhs_c,
                      mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        rhs = tl.load(rhs_ptr + cc[:, None] * stride_rhs_c + cols[None, :] * stride_rhs_n,
                      mask=c_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(lhs, rhs, acc, input_precision=PRECISION)
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


def rank_block(r: int) -> int:
    """BLOCK_R: a power of two >= 16 (tl.dot's minimum), at most 64 per step."""
    return max(16, min(64, triton.next_power_of_2(r)))


def precision(dtype) -> str:
    """tl.dot input precision: exact fp32 products for float32, native otherwise."""
    return "ieee" if jnp.dtype(dtype) == jnp.float32 else "tf32"


def launch_config(dtype) -> dict:
    """num_warps / num_stages: fp32 tiles are twice the shared memory of bf16."""
    return dict(num_warps=8, num_stages=2 if jnp.dtype(dtype).itemsize == 4 else 3)


def _row_major(rows: int, cols: int, transposed: bool) -> tuple[int, int]:
    """Strides of a [rows, cols] view of a row-major buffer ([cols, rows] if transposed)."""
    return (1, rows) if transposed else (cols, 1)


def fused_matmul_triton(lhs, rhs, lo, lo_rhs, *, transpose_rhs: bool,
                        block_sizes: BlockSizes):
    """``lhs @ op(rhs) + lo @ op(lo_rhs)`` through jax-triton (see lora_vjp).

    Shapes as ``fused_matmul_pallas``: rhs [C, O] or, transposed, [O, C];
    lo_rhs [r, O] or [O, r]. Tiles from block_sizes: (block_m, block_n,
    block_k) forward, (block_m_dx, block_k_dx, block_n_dx) when transposed.
    """
    import jax_triton  # pylint: disable=import-outside-toplevel
    m, c = lhs.shape
    r = lo.shape[1]
    o = rhs.shape[0] if transpose_rhs else rhs.shape[1]
    bs = block_sizes
    if transpose_rhs:
        bm, bo, bc = bs.block_m_dx, bs.block_k_dx, bs.block_n_dx
    else:
        bm, bo, bc = bs.block_m, bs.block_n, bs.block_k
    return jax_triton.triton_call(
        lhs, rhs, lo, lo_rhs, m, o, c, r,
        *_row_major(m, c, False), *_row_major(c, o, transpose_rhs),
        *_row_major(m, r, False), *_row_major(r, o, transpose_rhs),
        *_row_major(m, o, False),
        kernel=lora_matmul_kernel,
        out_shape=jax.ShapeDtypeStruct((m, o), lhs.dtype),
        grid=(triton.cdiv(m, bm), triton.cdiv(o, bo)),
        name="lora_fused_matmul_t" if transpose_rhs else "lora_fused_matmul",
        BLOCK_M=bm, BLOCK_N=bo, BLOCK_C=bc, BLOCK_R=rank_block(r),
        PRECISION=precision(lhs.dtype), **launch_config(lhs.dtype))
