"""NF4 LoRA linear (QLoRA): public entry point, validation, dispatch, reference.

    y = x @ W.T + scale * (x @ a) @ b            W [N, K] = jlora.nf4.dequantize(w_nf4)

with x [..., K], w_nf4 an ``NF4Tensor`` of shape (N, K) in torch orientation
(out_features first; NF4 blocks run along K inside each row), a [K, r] and
b [r, N] (Flax orientation: PEFT's lora_A.weight.T and lora_B.weight.T).
Computation runs in x's dtype with fp32 accumulation: W is dequantized exactly
as ``jlora.nf4.dequantize(w_nf4, x.dtype)`` (float32 ``code * absmax``, then
cast), so the kernels and the reference see the same weight bits. Gradients
flow to x, a and b; the frozen weight gets no cotangent (like
``jax.lax.stop_gradient``) and is never dequantized to HBM by the Pallas
kernels, in either pass.

Double-quantized absmax is decoded in XLA first (``jlora.nf4`` does it: N*K /
blocksize floats, 1/32 of a bf16 W at blocksize 64) and passed to the kernels
as float32.

Example::

  q = jlora.nf4.quantize(w_torch)                    # [out, in]
  y = nf4_lora_linear(x, q, a, b, scale=lora_alpha / r)
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from jlora.kernels.block_sizes import LANE
from jlora.kernels.block_sizes import SUBLANE
from jlora.kernels.block_sizes import BlockSizes
from jlora.kernels.dispatch import auto_impl
from jlora.kernels.dispatch import require_triton
from jlora.kernels.dispatch import triton_blocks
from jlora.kernels.lora_linear import IMPLS
from jlora.kernels.lora_linear import PALLAS_DTYPES
from jlora.kernels.lora_linear import check_adapter_args
from jlora.kernels.lora_linear import lora_linear_reference
from jlora.kernels.nf4_vjp import NF4Config
from jlora.kernels.nf4_vjp import nf4_lora_matmul
from jlora.nf4 import NF4Tensor
from jlora.nf4 import dequantize
from jlora.nf4.dequantize import absmax_f32


def nf4_lora_linear_reference(x, w_nf4: NF4Tensor, a, b, *, scale):
    """Plain jnp: ``jlora.nf4.dequantize`` then ``lora_linear_reference``.

    Ordinary autodiff; the same dtype policy as ``nf4_lora_linear``.
    """
    w = dequantize(w_nf4, x.dtype)  # [N, K]
    return lora_linear_reference(x, w.T, a, b, scale=scale)


@functools.partial(jax.jit, static_argnames=("impl", "interpret", "block_sizes"))
def nf4_lora_linear(x, w_nf4: NF4Tensor, a, b, *, scale, impl: str = "auto",
                    interpret: bool = False,
                    block_sizes: BlockSizes | None = None):
    """Fused ``y = x @ dequantize(w_nf4).T + scale * (x @ a) @ b`` (module docstring).

    Args:
      x: [..., K] activations; float32, bfloat16 or float16.
      w_nf4: frozen ``jlora.nf4.NF4Tensor`` of shape (N, K), any blocksize,
        with or without double quantization.
      a: [K, r] LoRA A; b: [r, N] LoRA B (any floating dtype; cast to x's).
      scale: scalar, lora_alpha / r (or / sqrt(r)); may be traced; no gradient.
      impl: "pallas" (TPU Mosaic kernels that dequantize inside the tiles; any
        backend with ``interpret=True``), "xla" (dequantize W in XLA, two dots,
        the same custom backward), "triton" (GPU Triton kernels through
        jax-triton: the ``gpu`` extra) or "auto": Pallas on TPU (or with
        ``interpret``) when the shapes tile (K a multiple of
        ``lcm(256, blocksize)``; N of 128 or one block) and the dtype is
        float32/bfloat16; else XLA (Triton is opt-in until timed on a GPU).
      interpret: run the Pallas kernels in interpret mode (CPU tests).
      block_sizes: tiles, as for ``lora_linear`` (forward: block_m, block_n,
        block_k; dx: block_m_dx, block_k_dx, block_n_dx). Pallas K blocks must
        be multiples of ``lcm(256, blocksize)`` dividing K; default
        ``BlockSizes.get_default().fit_nf4(...)``. For impl="triton", the
        Triton tiles (default ``TRITON_BLOCK_SIZES``).

    Returns:
      y [..., N] in x's dtype.
    """
    _check_args(x, w_nf4, a, b, scale, impl)
    *lead, k = x.shape
    n = w_nf4.shape[0]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    resolved, blocks = _resolve(impl, x.dtype, m, k, n, w_nf4.blocksize,
                                block_sizes, interpret)
    absmax = jax.lax.stop_gradient(absmax_f32(w_nf4)).astype(jnp.float32)
    cfg = NF4Config(shape=tuple(w_nf4.shape), blocksize=w_nf4.blocksize,
                    impl=resolved, block_sizes=blocks, interpret=interpret)
    y = nf4_lora_matmul(x2, w_nf4.codes, absmax, a, b, scale, cfg)
    return y.reshape(*lead, n)


def _check_args(x, w_nf4, a, b, scale, impl):
    if impl not in IMPLS:
        raise ValueError(f"{impl=} is not one of {IMPLS}")
    if not isinstance(w_nf4, NF4Tensor):
        found = (f"an array of shape {tuple(w_nf4.shape)}" if hasattr(w_nf4, "shape")
                 else type(w_nf4).__name__)
        raise TypeError(f"w_nf4 must be a jlora.nf4.NF4Tensor, got {found}; for a "
                        "dense weight use lora_linear")
    if x.ndim < 2:
        raise ValueError(f"{x.shape=} must be [M, K] or [..., K]")
    k = x.shape[-1]
    if len(w_nf4.shape) != 2 or w_nf4.shape[1] != k:
        raise ValueError(f"w_nf4.shape={tuple(w_nf4.shape)} does not match "
                         f"{x.shape=}: expected [N, K={k}] (torch orientation, "
                         "out_features first)")
    n = w_nf4.shape[0]
    size = n * k
    want_codes = ((size + 1) // 2,)
    if tuple(w_nf4.codes.shape) != want_codes or w_nf4.codes.dtype != jnp.uint8:
        raise ValueError(f"w_nf4.codes is {w_nf4.codes.dtype}{list(w_nf4.codes.shape)}"
                         f", expected uint8{list(want_codes)} for "
                         f"w_nf4.shape={tuple(w_nf4.shape)}")
    blocks = -(-size // w_nf4.blocksize)
    if tuple(w_nf4.absmax.shape) != (blocks,):
        raise ValueError(f"w_nf4.absmax.shape={tuple(w_nf4.absmax.shape)}, expected "
                         f"({blocks},) for w_nf4.shape={tuple(w_nf4.shape)} and "
                         f"blocksize={w_nf4.blocksize}")
    check_adapter_args(x, a, b, scale, n=n, weight=f"w_nf4.shape={tuple(w_nf4.shape)}")


def _resolve(impl, dtype, m, k, n, blocksize, block_sizes, interpret):
    """("xla", None) or ("pallas" | "triton", BlockSizes)."""
    if impl == "xla" or 0 in (m, k, n):
        return "xla", None
    auto = impl == "auto"
    if auto:
        impl = auto_impl(interpret)
    if impl == "triton":
        require_triton()
        return "triton", triton_blocks(block_sizes)
    if impl == "xla":
        return "xla", None
    itemsize = jnp.dtype(dtype).itemsize
    if jnp.dtype(dtype) not in PALLAS_DTYPES:
        if auto:
            return "xla", None
        raise TypeError(f"impl='pallas' supports {[d.name for d in PALLAS_DTYPES]}, "
                        f"got x.dtype={jnp.dtype(dtype).name}; use impl='xla'")
    if block_sizes is not None:
        try:
            _check_blocks(block_sizes, m, k, n, blocksize, interpret)
        except ValueError:
            if auto:
                return "xla", None
            raise
        return "pallas", dataclasses.replace(
            block_sizes, block_m=min(block_sizes.block_m, m),
            block_m_dx=min(block_sizes.block_m_dx, m))
    blocks = BlockSizes.get_default().fit_nf4(m, k, n, blocksize=blocksize,
                                              itemsize=itemsize)
    if blocks is None:
        if auto:
            return "xla", None
        raise ValueError(
            f"impl='pallas' cannot tile {m=}, {k=}, {n=} with blocksize={blocksize}: "
            f"K must be a multiple of {math.lcm(2 * LANE, blocksize)} and N of "
            f"{LANE} (or at most one block); use impl='auto' to fall back to XLA")
    return "pallas", blocks


def _check_blocks(bs: BlockSizes, m, k, n, blocksize, interpret):
    """Explicit NF4 tiles: whole NF4 blocks and 128-lane plane chunks along K."""
    unit = math.lcm(2 * LANE, blocksize)
    for name in ("block_k", "block_k_dx"):
        block = getattr(bs, name)
        if block % unit or k % block:
            raise ValueError(f"{name}={block} must divide k={k} and be a multiple of "
                             f"{unit} (lcm of 256 and blocksize={blocksize})")
        if block > 128 * blocksize:
            raise ValueError(f"{name}={block} spans more than 128 NF4 blocks of "
                             f"{blocksize}")
    for name in ("block_n", "block_n_dx"):
        block = getattr(bs, name)
        if n % block:
            raise ValueError(f"{name}={block} must divide n={n}")
        if not interpret and block != n and block % LANE:
            raise ValueError(f"{name}={block} must be a multiple of {LANE} (or equal "
                             f"n={n}) for the Mosaic TPU compiler")
    if not interpret:
        for name in ("block_m", "block_m_dx"):
            block = getattr(bs, name)
            if block < m and block % SUBLANE:
                raise ValueError(f"{name}={block} must be a multiple of {SUBLANE} for "
                                 "the Mosaic TPU compiler")
