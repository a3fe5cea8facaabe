"""Gradient wiring for the NF4 LoRA linear (custom_vjp), apart from the kernels.

    y  = x @ W.T + xa @ b                  xa = scale * x @ a      [M, r]
    dx = dy @ W  + g @ a.T                 g  = scale * dy @ b.T   [M, r]
    da = x.T @ g
    db = xa.T @ dy
    W  = dequantize(codes, absmax)         frozen: no cotangent (a symbolic zero)

Residuals are the packed codes and float32 absmax (never a dequantized W), x,
a, b, scale and xa. The two large products go to the chosen backend:

* "xla": dequantize W in XLA (``nf4_matmul.dequantize_xla``) and two dots, in
  both passes; W is materialised per pass but not saved between them.
* "pallas": ``nf4_matmul_fwd_pallas`` / ``nf4_matmul_dx_pallas`` (dequant in
  the tiles; XLA only decodes absmax and lays it out per K tile).
* "triton": the Triton kernel of triton_nf4.py for both passes (GPU).

The rank-r path runs in the adapters' dtype with "xla" (as PEFT) and in x's dtype in the
Pallas and Triton kernels (lora_vjp.low_rank_dtype).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jlora.kernels.block_sizes import BlockSizes
from jlora.kernels.block_sizes import NF4_CACHE_BYTES
from jlora.kernels.lora_vjp import low_rank_dtype
from jlora.kernels.nf4_matmul import absmax_tiles
from jlora.kernels.nf4_matmul import dequantize_xla
from jlora.kernels.nf4_matmul import nf4_matmul_dx_pallas
from jlora.kernels.nf4_matmul import nf4_matmul_fwd_pallas
from jlora.kernels.small_dot import thin_dot
from jlora.kernels.small_dot import thin_t_dot


class NF4Config(NamedTuple):
    """Static facts of one call: the weight's shape and blocksize, the backend."""

    shape: tuple[int, int]  # (N, K), torch orientation
    blocksize: int
    impl: str  # "xla", "pallas" or "triton"
    block_sizes: BlockSizes | None
    interpret: bool


def _dot_nt(lhs, rhs):
    """lhs @ rhs.T without a transpose op (XLA:CPU keeps bf16 dots native this way)."""
    return jax.lax.dot_general(lhs, rhs, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)


def _cache(m: int, block_m: int, band_bytes: int) -> bool:
    """Keep a band of dequantized tiles when several row blocks reuse it."""
    return m > block_m and band_bytes <= NF4_CACHE_BYTES


def _forward(x, codes, absmax, xa, b, cfg: NF4Config):
    """x @ W.T + xa @ b in x's dtype (xa and b in the rank-r dtype, already cast)."""
    n, k = cfg.shape
    dt = x.dtype
    if cfg.impl == "xla":
        w = dequantize_xla(codes, absmax, shape=cfg.shape, blocksize=cfg.blocksize,
                           dtype=dt)
        acc = _dot_nt(x, w) + jnp.dot(xa, b, preferred_element_type=jnp.float32)
        return acc.astype(dt)
    if cfg.impl == "pallas":
        bs = cfg.block_sizes
        return nf4_matmul_fwd_pallas(
            x, codes.reshape(n, k // 2),
            absmax_tiles(absmax, n, k, cfg.blocksize, bs.block_k), xa, b,
            blocksize=cfg.blocksize, block_m=bs.block_m, block_n=bs.block_n,
            block_k=bs.block_k,
            cache=_cache(x.shape[0], bs.block_m, k * bs.block_n * dt.itemsize),
            interpret=cfg.interpret)
    if cfg.impl == "triton":
        from jlora.kernels import triton_nf4  # pylint: disable=import-outside-toplevel
        return triton_nf4.nf4_matmul_triton(
            x, codes, absmax, xa, b, shape=cfg.shape, blocksize=cfg.blocksize,
            transpose_w=False, block_sizes=cfg.block_sizes)
    raise ValueError(f"nf4 matmul has no backend impl={cfg.impl!r}")


def _input_grad(dy, codes, absmax, g, a, cfg: NF4Config):
    """dy @ W + g @ a.T in dy's dtype (g and a in the rank-r dtype, already cast)."""
    n, k = cfg.shape
    dt = dy.dtype
    m = dy.shape[0]
    if cfg.impl == "xla":
        w = dequantize_xla(codes, absmax, shape=cfg.shape, blocksize=cfg.blocksize,
                           dtype=dt)
        acc = jnp.dot(dy, w, preferred_element_type=jnp.float32) + _dot_nt(g, a)
        return acc.astype(dt)
    if cfg.impl == "pallas":
        bs = cfg.block_sizes
        return nf4_matmul_dx_pallas(
            dy, codes.reshape(n, k // 2),
            absmax_tiles(absmax, n, k, cfg.blocksize, bs.block_k_dx), g, a,
            blocksize=cfg.blocksize, block_m=bs.block_m_dx, block_n=bs.block_n_dx,
            block_k=bs.block_k_dx,
            cache=_cache(m, bs.block_m_dx, n * bs.block_k_dx * dt.itemsize),
            interpret=cfg.interpret)
    if cfg.impl == "triton":
        from jlora.kernels import triton_nf4  # pylint: disable=import-outside-toplevel
        return triton_nf4.nf4_matmul_triton(
            dy, codes, absmax, g, a.T, shape=cfg.shape, blocksize=cfg.blocksize,
            transpose_w=True, block_sizes=cfg.block_sizes)
    raise ValueError(f"nf4 matmul has no backend impl={cfg.impl!r}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def nf4_lora_matmul(x, codes, absmax, a, b, scale, cfg: NF4Config):
    """y = x @ W.T + scale * (x @ a) @ b for 2-D x [M, K]; shapes already checked.

    codes: the NF4Tensor's flat uint8 codes; absmax: its float32 per-block
    scales (double quantization already decoded).
    """
    y, _ = _nf4_lora_matmul_fwd(x, codes, absmax, a, b, scale, cfg)
    return y


def _nf4_lora_matmul_fwd(x, codes, absmax, a, b, scale, cfg):
    dt = x.dtype
    lo = low_rank_dtype(cfg.impl, dt, a.dtype)
    xa = thin_dot(x, a, lo, scale).astype(lo)
    y = _forward(x, codes, absmax, xa, b.astype(lo), cfg)
    return y, (x, codes, absmax, a, b, scale, xa)


def _nf4_lora_matmul_bwd(cfg, residuals, dy):
    x, codes, absmax, a, b, scale, xa = residuals
    dt = x.dtype
    lo = xa.dtype
    dy = dy.astype(dt)
    g = thin_dot(dy, b.T, lo, scale).astype(lo)
    dx = _input_grad(dy, codes, absmax, g, a.astype(lo), cfg)
    da = thin_t_dot(g, x, lo).T.astype(a.dtype)
    db = thin_t_dot(xa, dy, lo).astype(b.dtype)
    return dx, None, None, da, db, None


nf4_lora_matmul.defvjp(_nf4_lora_matmul_fwd, _nf4_lora_matmul_bwd)
