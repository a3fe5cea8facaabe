"""Gradient wiring for the fused LoRA linear (custom_vjp), apart from the kernels.

    y  = x @ w + xa @ b                    xa = scale * x @ a      [M, r]
    dx = dy @ w.T + g @ a.T                g  = scale * dy @ b.T   [M, r]
    da = x.T @ g
    db = xa.T @ dy
    dw = 0        (w is frozen: never computed; a symbolic zero, like stop_gradient)

The two [M, K] x [K, N]-sized products (y and dx) go through ``fused_matmul``
(Pallas, Triton or XLA); the small rank-r products (xa, g, da, db) are plain XLA dots
with fp32 accumulation. Residuals are x, w, a, b, scale and xa; xa is saved
rather than recomputed because it is only [M, r].
"""

from __future__ import annotations

import functools

import jax

from jlora.kernels.block_sizes import BlockSizes
from jlora.kernels.fused_matmul import fused_matmul_pallas
from jlora.kernels.fused_matmul import fused_matmul_xla
from jlora.kernels.small_dot import small_dot as _small_dot


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


def _lora_matmul_fwd(x, w, a, b, scale, impl, block_sizes, interpret):
    dt = x.dtype
    xa = _small_dot(x, a.astype(dt), scale).astype(dt)
    y = fused_matmul(x, w.astype(dt), xa, b.astype(dt), transpose_rhs=False,
                     impl=impl, block_sizes=block_sizes, interpret=interpret)
    return y, (x, w, a, b, scale, xa)


def _lora_matmul_bwd(impl, block_sizes, interpret, residuals, dy):
    x, w, a, b, scale, xa = residuals
    dt = x.dtype
    dy = dy.astype(dt)
    g = _small_dot(dy, b.astype(dt).T, scale).astype(dt)
    dx = fused_matmul(dy, w.astype(dt), g, a.astype(dt), transpose_rhs=True,
                      impl=impl, block_sizes=block_sizes, interpret=interpret)
    da = _small_dot(x.T, g).astype(a.dtype)
    db = _small_dot(xa.T, dy).astype(b.dtype)
    return dx, None, da, db, None


lora_matmul.defvjp(_lora_matmul_fwd, _lora_matmul_bwd)
