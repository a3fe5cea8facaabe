"""Two-operand einsum that keeps 16-bit operands native in the forward pass and in both gradients.

    z  = einsum(spec, x, y)                 accumulated in float32, returned in x's dtype
    dx = einsum(spec_dx, dz, y)             spec "X,Y->Z" gives spec_dx "Z,Y->X"
    dy = einsum(spec_dy, x, dz)             and spec_dy "X,Z->Y"

Why: XLA:CPU rewrites a bf16 x bf16 -> bf16 dot into an f32 dot (both operands converted every
step); only bf16 x bf16 -> f32 (``preferred_element_type=float32``) runs as a native bf16 dot
(AVX512-BF16 / AMX, about 2x the f32 rate). ``preferred_element_type`` alone fixes only the
forward: JAX's transpose rule hands the gradient dots an f32 cotangent, so they run f32 x f32.
Here the cotangent is cast back to the operands' dtype and each gradient is its own
bf16 x bf16 -> f32 dot. In float32 this is exactly ``jnp.einsum``.

Used for the frozen projections (``x @ W``, the tied head ``x @ E^T``) and the attention
products. The gradient with respect to a frozen weight is returned like any other; when nothing
differentiates the weight (a LoRA step), XLA drops that dot as dead code.

The spec must be explicit (``->``), with every index of an operand also in the other operand or
in the output (an index summed within one operand has no einsum transpose of this form).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["einsum", "linear"]


@functools.cache
def _gradient_specs(spec: str) -> tuple[str, str]:
    inputs, sep, out = spec.replace(" ", "").partition("->")
    xs, comma, ys = inputs.partition(",")
    if not sep or not comma or "," in ys or "." in spec:
        raise ValueError(f"mixed_dot.einsum needs an explicit two-operand spec 'X,Y->Z' without '...', "
                         f"got {spec!r}")
    for name, term, others in (("first", xs, ys + out), ("second", ys, xs + out)):
        lonely = [c for c in term if c not in others]
        if lonely or len(set(term)) != len(term):
            raise ValueError(f"mixed_dot.einsum spec {spec!r}: every index of the {name} operand must "
                             f"appear once, and also in the other operand or the output; found {term!r}")
    return f"{out},{ys}->{xs}", f"{xs},{out}->{ys}"


def _dot(spec, x, y):
    return jnp.einsum(spec, x, y, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def einsum(spec: str, x: jax.Array, y: jax.Array) -> jax.Array:
    """``jnp.einsum(spec, x, y)`` in float32 accumulation, in x's dtype (see the module docstring).

    y is cast to x's dtype first (a float32 weight with a bf16 activation computes in bf16).
    """
    _gradient_specs(spec)
    return _dot(spec, x, y.astype(x.dtype)).astype(x.dtype)


def _einsum_fwd(spec, x, y):
    return einsum(spec, x, y), (x, y)


def _einsum_bwd(spec, residuals, dz):
    x, y = residuals
    spec_dx, spec_dy = _gradient_specs(spec)
    dz = dz.astype(x.dtype)
    dx = _dot(spec_dx, dz, y.astype(x.dtype)).astype(x.dtype)
    dy = _dot(spec_dy, x, dz).astype(y.dtype)
    return dx, dy


einsum.defvjp(_einsum_fwd, _einsum_bwd)


def linear(x: jax.Array, w: jax.Array, *, transpose_w: bool = False) -> jax.Array:
    """x [..., K] @ w [K, N] (or @ w.T for w [N, K] with transpose_w) -> [..., N] in x's dtype.

    The leading axes are folded into one row axis first: XLA:CPU runs a dot with several
    contracting axes (the weight gradient x^T dz of a [B, T, K] activation) several times slower
    than the same product on [B*T, K].
    """
    *lead, k = x.shape
    x2 = x.reshape(-1, k)
    y = einsum("mk,nk->mn" if transpose_w else "mk,kn->mn", x2, w)
    return y.reshape(*lead, y.shape[-1])
