"""Fused base-plus-low-rank matmul: one Pallas TPU kernel for both LoRA passes.

    out = lhs @ op(rhs) + lo @ op(lo_rhs)          op = identity or transpose

The forward pass is ``y = x @ w + xa @ b`` (op = identity, xa = scale * x @ a);
the input gradient is ``dx = dy @ w.T + g @ a.T`` (op = transpose,
g = scale * dy @ b.T). The kernel tiles (rows, out, contraction) with an fp32
accumulator zeroed under ``pl.when(program_id(2) == 0)`` and adds the low-rank
product as an epilogue on the same output tile at the last contraction step, so
the rank-r update costs one extra [bm, r] @ [r, bn] MXU product per tile and no
extra pass over y. The transposed variant reads ``w`` in its stored [K, N]
layout (a transposed-rhs dot on the tile), so ``w.T`` is never materialised.

``lo`` is precomputed by the caller as a small [M, r] product: it is the
residual the backward pass needs anyway (db = xa.T @ dy), it costs r/N of the
base FLOPs, and computing it inside the K loop would either repeat it once per
N tile or force the N grid axis to run sequentially (no megacore split).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


def _dot(lhs, rhs, transpose_rhs: bool):
    """lhs @ rhs (or lhs @ rhs.T) with fp32 accumulation."""
    contract_rhs = 1 if transpose_rhs else 0
    return lax.dot_general(
        lhs, rhs, (((1,), (contract_rhs,)), ((), ())),
        preferred_element_type=jnp.float32)


def fused_matmul_xla(lhs, rhs, lo, lo_rhs, *, transpose_rhs: bool):
    """The same product with two XLA dots (the fallback and the GPU/CPU path)."""
    acc = _dot(lhs, rhs, transpose_rhs) + _dot(lo, lo_rhs, transpose_rhs)
    return acc.astype(lhs.dtype)


def _fused_kernel(lhs_ref, rhs_ref, lo_ref, lo_rhs_ref, out_ref, acc_ref, *,
                  transpose_rhs: bool):
    c = pl.program_id(2)

    @pl.when(c == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    acc_ref[...] += _dot(lhs_ref[...], rhs_ref[...], transpose_rhs)

    @pl.when(c == pl.num_programs(2) - 1)
    def _epilogue():
        low_rank = _dot(lo_ref[...], lo_rhs_ref[...], transpose_rhs)
        out_ref[...] = (acc_ref[...] + low_rank).astype(out_ref.dtype)


@functools.partial(
    jax.jit,
    static_argnames=("transpose_rhs", "block_rows", "block_out",
                     "block_contract", "interpret"))
def fused_matmul_pallas(lhs, rhs, lo, lo_rhs, *, transpose_rhs: bool,
                        block_rows: int, block_out: int, block_contract: int,
                        interpret: bool = False):
    """Pallas TPU kernel for ``lhs @ op(rhs) + lo @ op(lo_rhs)``.

    Shapes: lhs [M, C]; rhs [C, O] (or [O, C] when transposed); lo [M, r];
    lo_rhs [r, O] (or [O, r]). ``block_contract`` must divide C and
    ``block_out`` must divide O; M may be ragged. The caller validates.
    """
    m, c = lhs.shape
    r = lo.shape[1]
    o = rhs.shape[0] if transpose_rhs else rhs.shape[1]
    bm, bo, bc = block_rows, block_out, block_contract

    if transpose_rhs:
        rhs_spec = pl.BlockSpec((bo, bc), lambda i, j, kk: (j, kk))
        lo_rhs_spec = pl.BlockSpec((bo, r), lambda i, j, kk: (j, 0))
    else:
        rhs_spec = pl.BlockSpec((bc, bo), lambda i, j, kk: (kk, j))
        lo_rhs_spec = pl.BlockSpec((r, bo), lambda i, j, kk: (0, j))

    itemsize = jnp.dtype(lhs.dtype).itemsize
    grid = (pl.cdiv(m, bm), o // bo, c // bc)
    cost = pl.CostEstimate(
        flops=2 * m * o * (c + r),
        transcendentals=0,
        # lhs is re-read once per output column block, rhs once per row block.
        bytes_accessed=itemsize * (m * c * grid[1] + c * o * grid[0] + m * o
                                   + m * r * grid[1] + r * o * grid[0]),
    )
    return pl.pallas_call(
        functools.partial(_fused_kernel, transpose_rhs=transpose_rhs),
        out_shape=jax.ShapeDtypeStruct((m, o), lhs.dtype),
        grid=grid,
        in_specs=[
            pl.BlockSpec((bm, bc), lambda i, j, kk: (i, kk)),
            rhs_spec,
            pl.BlockSpec((bm, r), lambda i, j, kk: (i, 0)),
            lo_rhs_spec,
        ],
        out_specs=pl.BlockSpec((bm, bo), lambda i, j, kk: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bo), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=cost,
        interpret=interpret,
        name="lora_fused_matmul_t" if transpose_rhs else "lora_fused_matmul",
    )(lhs, rhs, lo, lo_rhs)
