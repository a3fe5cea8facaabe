"""Gradient wiring for the fused LoRA linear (custom_vjp), apart from the kernels.

    y  = x @ w + xa @ b                    xa = scale * x @ a      [M, r]
    dx = dy @ w.T + g @ a.T                g  = scale * dy @ b.T   [M, r]
    da = x.T @ g
    db = xa.T @ dy
    dw = 0        (w is frozen: never computed; a symbolic zero, like stop_gradient)

The two [M, K] x [K, N]-sized products (y and dx) go through ``fused_matmul``
(Pallas, Triton or XLA); the small rank-r products (xa, g, da, db) are XLA dots
with fp32 accumulation (small_dot.py: on CPU in the forms XLA:CPU runs fast).
Residuals are x, w, a, b, scale and xa; xa is saved rather than recomputed because it is
only [M, r].

Precision of the rank-r path: with impl="xla" it runs in the adapters' dtype (float32 adapters on
a bf16 base: x is cast up, xa and g stay float32 and are summed with the frozen product in the
float32 accumulator), as PEFT's ``lora.Linear`` casts x to ``lora_A.weight.dtype``; on CPU the float32
operand is split exactly into bf16 parts instead of casting x and dy up (the same products). The Pallas and
Triton kernels take xa and g rounded to x's dtype (one dtype per kernel operand).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jlora.kernels.block_sizes import BlockSizes
from jlora.kernels.fused_matmul import fused_matmul_pallas
from jlora.kernels.fused_matmul import fused_matmul_xla
from jlora.kernels.small_dot import thin_dot
from jlora.kernels.small_dot import thin_t_dot


def fused_matmul(lhs, rhs, lo, lo_rhs, *, transpose_rhs: bool, impl: str,
                 block_sizes: BlockSizes | None, interpret: bool):
    """Dispatches ``lhs @ op(rhs) + lo @ op(lo_rhs)`` to a resolved backend."""
    if impl == "xla":
        return fused_matmul_xla(lhs, rhs, lo, lo_rhs, transpose_rhs=transpose_rhs)
    if impl == "pallas":
        bs = block_sizes
        if transpose_rhs:
            blocks = dict(block_rows=bs.block_m_dx, block_out=bs.block_k_dx,
                          block_contract=bs.block_n_dx)
        else:
            blocks = dict(block_rows=bs.block_m, block_out=bs.block_n,
                          block_contract=bs.block_k)
        return fused_matmul_pallas(lhs, rhs, lo, lo_rhs, transpose_rhs=transpose_rhs,
                                   interpret=interpret, **blocks)
    if impl == "triton":
        from jlora.kernels import triton_lora  # pylint: disable=import-outside-toplevel
        return triton_lora.fused_matmul_triton(
            lhs, rhs, lo, lo_rhs, transpose_rhs=transpose_rhs,
            block_sizes=block_sizes)
    raise ValueError(f"fused_matmul has no backend {impl=}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def lora_matmul(x, w, a, b, scale, impl, block_sizes, interpret):
    """y = x @ w + scale * (x @ a) @ b for 2-D x [M, K]; shapes already checked."""
    y, _ = _lora_matmul_fwd(x, w, a, b, scale, impl, block_sizes, interpret)
    return y


def low_rank_dtype(impl: str, x_dtype, a_dtype):
    """The dtype of the rank-r path: the adapters' for XLA (as PEFT), x's for the fused kernels."""
    return jnp.dtype(a_dtype) if impl == "xla" else jnp.dtype(x_dtype)


def _lora_matmul_fwd(x, w, a, b, scale, impl, block_sizes, interpret):
    dt = x.dtype
    lo = low_rank_dtype(impl, dt, a.dtype)
    xa = thin_dot(x, a, lo, scale).astype(lo)
    y = fused_matmul(x, w.astype(dt), xa, b.astype(lo), transpose_rhs=False,
                     impl=impl, block_sizes=block_sizes, interpret=interpret)
    return y, (x, w, a, b, scale, xa)


def _lora_matmul_bwd(impl, block_sizes, interpret, residuals, dy):
    x, w, a, b, scale, xa = residuals
    dt = x.dtype
    lo = xa.dtype
    dy = dy.astype(dt)
    g = thin_dot(dy, b.T, lo, scale).astype(lo)
    dx = fused_matmul(dy, w.astype(dt), g, a.astype(lo), transpose_rhs=True,
                      impl=impl, block_sizes=block_sizes, interpret=interpret)
    da = thin_t_dot(g, x, lo).T.astype(a.dtype)
    db = thin_t_dot(xa, dy, lo).astype(b.dtype)
    return dx, None, da, db, None


lora_matmul.defvjp(_lora_matmul_fwd, _lora_matmul_bwd)
