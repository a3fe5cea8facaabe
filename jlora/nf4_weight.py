"""A projection weight stored frozen in NF4, and its matmul as bitsandbytes' `Linear4bit` computes it.

A quantized `Linear` holds `kernel = NF4Weight(NF4Tensor)`, the weight in torch orientation
[out, in] (bitsandbytes' layout), and computes (arXiv 2305.14314):

    W = dequantize(q, q.dtype).astype(compute dtype)        # q.dtype: the dtype it was quantized from
    y = x @ W^T

`NF4Weight` is an `nnx.Variable` but not an `nnx.Param`: `nnx.split(model, LoRAParam, ...)` leaves it
in the frozen state, optimizers built `wrt=LoRAParam` (or `nnx.Param`) never see it, and nothing
differentiates it. The backward pass of the matmul (`nf4_matmul`, a custom VJP) dequantizes again
instead of keeping every layer's dense weight alive between forward and backward, so a train step
holds the 4-bit base plus about one dense weight at a time, as bitsandbytes' `MatMul4Bit` does.

This is the piece of QLoRA the model itself needs (jlora.llama); quantizing a model is jlora.qlora,
one layer up.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jlora.nf4.dequantize import dequantize
from jlora.nf4.tensor import NF4Tensor


class NF4Weight(nnx.Variable):
    """Frozen NF4 storage of a projection weight: an `NF4Tensor` [out, in]. Never trained, never a Param."""


def _dense(q: NF4Tensor, dtype) -> jax.Array:
    """The weight [out, in] as bitsandbytes' Linear4bit uses it: dequantized to q.dtype, cast to dtype."""
    return dequantize(q, jnp.dtype(q.dtype)).astype(dtype)


def _contract_last(x: jax.Array, w: jax.Array, axis: int) -> jax.Array:
    """x [..., k] contracted with w along w's `axis` (w [n, k] with axis 1, or [k, n] with axis 0)."""
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (axis,)), ((), ())))


def _dense_after(q: NF4Tensor, t: jax.Array, dtype) -> jax.Array:
    """_dense(q, dtype), computed only once `t` exists.

    `(t0 != t0) & (t0 == t0)` is false for every t0, NaN included, but XLA does not fold it. The
    dependence keeps XLA from computing every layer's dense weight up front (they depend on nothing
    but frozen codes, so a scheduler may) and from merging the backward pass's dequantize with the
    forward one (CSE): either way every layer's dense weight would be alive at once. (XLA:CPU drops
    optimization barriers before CSE, so jax.checkpoint alone does not prevent it there.)
    """
    t0 = t.reshape(-1)[0]
    never = jnp.logical_and(t0 != t0, t0 == t0)
    return _dense(dataclasses.replace(q, codes=q.codes | never.astype(q.codes.dtype)), dtype)


@jax.custom_vjp
def nf4_matmul(x: jax.Array, q: NF4Tensor) -> jax.Array:
    """x [..., in] @ dequantize(q)^T -> [..., out] in x's dtype, as bitsandbytes' `Linear4bit`.

    The weight is dequantized to the dtype it was quantized from (the quant state's dtype), then
    cast to x's dtype. Differentiable in x only: q is frozen and its cotangent is zero. The dense
    weight exists only around its matmul: the backward pass dequantizes again, as bitsandbytes'
    `MatMul4Bit` does, rather than keep it from the forward pass.
    """
    return _contract_last(x, _dense_after(q, x, x.dtype), 1)


def _nf4_matmul_fwd(x, q):
    return nf4_matmul(x, q), q


def _nf4_matmul_bwd(q, g):
    zeros = jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0)
                         if not jnp.issubdtype(a.dtype, jnp.inexact) else jnp.zeros_like(a), q)
    return _contract_last(g, _dense_after(q, g, g.dtype), 0), zeros


nf4_matmul.defvjp(_nf4_matmul_fwd, _nf4_matmul_bwd)
