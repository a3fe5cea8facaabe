"""The rank-r products of the LoRA gradient wiring, shared by both VJP files.

    small_dot(lhs, rhs)            = lhs @ rhs                      accumulated in float32
    small_dot(lhs, rhs, scale)     = scale * (lhs @ rhs)            accumulated in float32
    thin_dot(x, u, lo, scale)      = scale * (x @ u)                x [M, K], u [K, r]; operands in dtype lo
    thin_t_dot(s, v, lo)           = s.T @ v                        s [M, r], v [M, K]; operands in dtype lo

The LoRA wiring calls them as xa = thin_dot(x, a), g = thin_dot(dy, b.T), da = thin_t_dot(g, x).T and
db = thin_t_dot(xa, dy): products with one dimension of size r, every result float32 (callers cast).

On XLA:CPU two forms matter (benchmarks/RESULTS.md, "rank-r products"):

* A bf16 operand times a float32 one (a bf16 base with PEFT's float32 adapters) would be a float32 dot on
  ``v.astype(float32)``: a converted [M, K] copy per product. Instead the float32 operand is split exactly
  into three bf16 parts, u = u1 + u2 + u3 (u1 = bf16(u), u2 = bf16(u - u1), u3 = bf16(u - u1 - u2): 8 + 8 + 8
  significand bits hold float32's 24, and bf16 has float32's exponent range), and the three products
  v @ u_i run as native bf16 x bf16 -> float32 dots and are summed in float32. Every product of two bf16
  numbers is exact in float32, so the result is the float32 product of v.astype(float32) and u up to the
  order of float32 additions (tests/kernels/test_small_dot.py checks it against float64).
* s.T @ v contracts both operands' leading axis, a form XLA:CPU runs at a tenth of a dot's usual rate. It is
  computed as [r, M] @ [M, K] with s.T materialised; optimization barriers keep XLA's transpose folding
  from turning either transpose (s.T, or the caller's .T of the result) back into that form.

Elsewhere (GPU, TPU) both are the plain float32 products.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_F32 = jnp.dtype(jnp.float32)
_BF16 = jnp.dtype(jnp.bfloat16)


def small_dot(lhs, rhs, scale=None):
    """``lhs @ rhs`` with float32 accumulation, times ``scale`` when given."""
    acc = jnp.dot(lhs, rhs, preferred_element_type=jnp.float32)
    return acc if scale is None else scale * acc


def thin_dot(x, u, lo, scale=None):
    """``scale * (x @ u)`` in float32 for x [M, K] and a thin u [K, r], the operands taken in dtype ``lo``."""
    if _split_on_cpu(x, lo):
        parts = _dot(x, _bf16_parts(u, axis=1), ((1,), (0,)))  # [M, 3r]
        acc = _sum_parts(parts, axis=1)
        return acc if scale is None else scale * acc
    return small_dot(x.astype(lo), u.astype(lo), scale)


def thin_t_dot(s, v, lo):
    """``s.T @ v`` [r, K] in float32 for a thin s [M, r] and v [M, K], the operands taken in dtype ``lo``."""
    if not _on_cpu():
        return small_dot(s.astype(lo).T, v.astype(lo))
    barrier = jax.lax.optimization_barrier
    if _split_on_cpu(v, lo):
        parts = barrier(_dot(barrier(_bf16_parts(s.T, axis=0)), v, ((1,), (0,))))  # [3r, K]
        return _sum_parts(parts, axis=0)
    return barrier(_dot(barrier(s.astype(lo).T), v.astype(lo), ((1,), (0,))))


def _on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def _split_on_cpu(wide, lo) -> bool:
    """A bf16 wide operand and float32 products on CPU: split the thin operand instead of converting."""
    return jnp.dtype(wide.dtype) == _BF16 and jnp.dtype(lo) == _F32 and _on_cpu()


def _bf16_parts(u, axis: int):
    """float32 u as three bf16 arrays concatenated along ``axis``; their float32 sum is u exactly."""
    u = u.astype(jnp.float32)
    first = u.astype(jnp.bfloat16)
    rest = u - first.astype(jnp.float32)
    second = rest.astype(jnp.bfloat16)
    third = (rest - second.astype(jnp.float32)).astype(jnp.bfloat16)
    return jnp.concatenate([first, second, third], axis=axis)


def _sum_parts(parts, axis: int):
    first, second, third = jnp.split(parts, 3, axis=axis)
    return first + (second + third)  # the two small ones first


def _dot(lhs, rhs, contracting):
    return jax.lax.dot_general(lhs, rhs, (contracting, ((), ())), preferred_element_type=jnp.float32)
