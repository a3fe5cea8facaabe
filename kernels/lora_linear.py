"""Fused LoRA linear: public entry point, validation, dispatch, and the reference.

    y = x @ w + scale * (x @ a) @ b

with x [..., K], w [K, N] (Flax kernel orientation, frozen), a [K, r], b [r, N].
Computation runs in x's dtype with fp32 accumulation; y has x's dtype. a and b
may be stored in a wider dtype (fp32 adapters with a bf16 base): they are cast to
x's dtype for the products and their gradients come back in their own dtype.

Gradients flow to x, a and b. The frozen weight gets a symbolic zero cotangent,
as if wrapped in ``jax.lax.stop_gradient``: dW is never computed (not even by
``impl="xla"``), so do not use this op for a weight you mean to train.

Example::

  y = lora_linear(x, w, a, b, scale=lora_alpha / r)
  da, db = jax.grad(lambda a, b: loss(lora_linear(x, w, a, b, scale=s)),
                    argnums=(0, 1))(a, b)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jlora.kernels.block_sizes import LANE
from jlora.kernels.block_sizes import SUBLANE
from jlora.kernels.block_sizes import BlockSizes
from jlora.kernels.dispatch import auto_impl
from jlora.kernels.dispatch import require_triton
from jlora.kernels.dispatch import triton_blocks
from jlora.kernels.lora_vjp import lora_matmul

IMPLS = ("auto", "xla", "pallas", "triton")
COMPUTE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16),
                  jnp.dtype(jnp.float16))
PALLAS_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def lora_linear_reference(x, w, a, b, *, scale):
    """Plain-jnp ``x @ w + scale * (x @ a) @ b``; ordinary autodiff, dW included.

    Same dtype policy as ``lora_linear``: products in x's dtype, fp32
    accumulation, x @ a rounded to x's dtype before the second product.
    """
    dt = x.dtype
    base = jnp.dot(x, w.astype(dt), preferred_element_type=jnp.float32)
    xa = jnp.dot(x, a.astype(dt), preferred_element_type=jnp.float32).astype(dt)
    low = jnp.dot(xa, b.astype(dt), preferred_element_type=jnp.float32)
    return (base + scale * low).astype(dt)


@functools.partial(jax.jit,
                   static_argnames=("impl", "interpret", "block_sizes"))
def lora_linear(x, w, a, b, *, scale, impl: str = "auto",
                interpret: bool = False,
                block_sizes: BlockSizes | None = None):
    """Fused ``y = x @ w + scale * (x @ a) @ b`` (see the module docstring).

    Args:
      x: [..., K] activations; float32, bfloat16 or float16.
      w: [K, N] frozen base weight (cast to x's dtype if it differs).
      a: [K, r] LoRA A (Flax orientation: PEFT's lora_A.weight.T).
      b: [r, N] LoRA B (PEFT's lora_B.weight.T).
      scale: scalar, lora_alpha / r (or / sqrt(r) for rsLoRA); may be traced.
        It gets no gradient.
      impl: "pallas" (TPU Mosaic kernel; any backend with ``interpret=True``),
        "xla" (two XLA dots, same custom backward), "triton" (GPU Triton kernel
        for y and dx through jax-triton: the ``gpu`` extra) or "auto": Pallas on
        TPU (or whenever ``interpret``) when the shapes tile and the dtype is
        float32/bfloat16; else XLA (Triton is opt-in until timed on a GPU).
      interpret: run the Pallas kernels in interpret mode (CPU tests).
      block_sizes: explicit tiles (K and N blocks must divide K and N; M may be
        ragged); default ``BlockSizes.get_default()`` for the first local device,
        shrunk to fit (see ``BlockSizes.fit``). Pass them explicitly when
        compiling ahead of time for another device. For impl="triton" they are
        the Triton tiles (powers of two, any shape; default
        ``TRITON_BLOCK_SIZES``).

    Returns:
      y [..., N] in x's dtype.
    """
    _check_args(x, w, a, b, scale, impl)
    *lead, k = x.shape
    n = w.shape[1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    resolved_impl, blocks = _resolve(impl, x.dtype, m, k, n, block_sizes,
                                     interpret)
    y = lora_matmul(x2, w, a, b, scale, resolved_impl, blocks, interpret)
    return y.reshape(*lead, n)


def _check_args(x, w, a, b, scale, impl):
    if impl not in IMPLS:
        raise ValueError(f"{impl=} is not one of {IMPLS}")
    if x.ndim < 2:
        raise ValueError(f"{x.shape=} must be [M, K] or [..., K]")
    k = x.shape[-1]
    if w.ndim != 2 or w.shape[0] != k:
        raise ValueError(f"{w.shape=} does not match {x.shape=}: expected [K={k}, N]")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"w.dtype={w.dtype} is not supported: expected a floating dtype "
                        "(dequantize NF4 weights first, or use nf4_lora_linear)")
    check_adapter_args(x, a, b, scale, n=w.shape[1], weight=f"w.shape={tuple(w.shape)}")


def check_adapter_args(x, a, b, scale, *, n: int, weight: str):
    """Checks what both kernels share: A [K, r] with r >= 1, B [r, N], x's dtype, a scalar scale."""
    k = x.shape[-1]
    if a.ndim != 2 or a.shape[0] != k:
        raise ValueError(f"{a.shape=} does not match {x.shape=}: expected [K={k}, r]")
    r = a.shape[1]
    if r == 0:
        raise ValueError(f"{a.shape=} has rank r=0; LoRA needs r >= 1")
    if b.shape != (r, n):
        raise ValueError(f"{b.shape=} does not match {a.shape=} and {weight}: expected [r={r}, N={n}]")
    if jnp.dtype(x.dtype) not in COMPUTE_DTYPES:
        raise TypeError(f"x.dtype={x.dtype} is not supported: expected one of "
                        f"{[d.name for d in COMPUTE_DTYPES]}")
    for name, arr in (("a", a), ("b", b)):
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            raise TypeError(f"{name}.dtype={arr.dtype} is not supported: expected a floating dtype")
    if jnp.ndim(scale) != 0:
        raise ValueError(f"scale must be a scalar, got shape {jnp.shape(scale)}")


def _resolve(impl, dtype, m, k, n, block_sizes, interpret):
    """Picks the backend and the tiles: ("xla", None), ("pallas" | "triton", BlockSizes)."""
    if impl == "xla" or 0 in (m, k, n):
        return "xla", None  # (an empty product has nothing to tile)
    if impl == "auto":
        impl = auto_impl(interpret)
        auto = True
    else:
        auto = False
    if impl == "triton":
        require_triton()
        return "triton", triton_blocks(block_sizes)
    if impl == "xla":
        return "xla", None
    pallas_ok_dtype = jnp.dtype(dtype) in PALLAS_DTYPES
    if not auto:  # impl == "pallas"
        if not pallas_ok_dtype:
            raise TypeError(f"impl='pallas' supports {[d.name for d in PALLAS_DTYPES]},"
                            f" got x.dtype={jnp.dtype(dtype).name}; use impl='xla'")
        if block_sizes is not None:
            _check_blocks(block_sizes, m, k, n, interpret)
            return "pallas", _clip_rows(block_sizes, m)
        blocks = BlockSizes.get_default().fit(m, k, n)
        if blocks is None:
            raise ValueError(f"impl='pallas' cannot tile {m=}, {k=}, {n=}: K and N "
                             f"must be multiples of {LANE} (or at most one block); "
                             "use impl='auto' to fall back to XLA")
        return "pallas", blocks
    # impl == "auto" resolved to pallas: fall back to XLA where it cannot run.
    if not pallas_ok_dtype:
        return "xla", None
    if block_sizes is not None:
        try:
            _check_blocks(block_sizes, m, k, n, interpret)
        except ValueError:
            return "xla", None
        return "pallas", _clip_rows(block_sizes, m)
    blocks = BlockSizes.get_default().fit(m, k, n)
    return ("xla", None) if blocks is None else ("pallas", blocks)


def _check_blocks(bs: BlockSizes, m, k, n, interpret):
    """Explicit tiles must divide K and N exactly; M may be ragged (masked)."""
    block_k, block_n = bs.block_k, bs.block_n
    block_k_dx, block_n_dx = bs.block_k_dx, bs.block_n_dx
    for name, block, dim_name, dim in (("block_k", block_k, "k", k),
                                       ("block_n", block_n, "n", n),
                                       ("block_k_dx", block_k_dx, "k", k),
                                       ("block_n_dx", block_n_dx, "n", n)):
        if dim % block:
            raise ValueError(f"{name}={block} must divide {dim_name}={dim}")
        if not interpret and block != dim and block % LANE:
            raise ValueError(f"{name}={block} must be a multiple of {LANE} (or equal "
                             f"{dim_name}={dim}) for the Mosaic TPU compiler")
    if not interpret:
        for name in ("block_m", "block_m_dx"):
            block = getattr(bs, name)
            if block < m and block % SUBLANE:
                raise ValueError(f"{name}={block} must be a multiple of {SUBLANE} for "
                                 "the Mosaic TPU compiler")


def _clip_rows(bs: BlockSizes, m: int) -> BlockSizes:
    """A row block larger than M becomes the whole of M (always a legal block)."""
    return dataclasses.replace(bs, block_m=min(bs.block_m, m),
                               block_m_dx=min(bs.block_m_dx, m))
