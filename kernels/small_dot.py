"""The rank-r products of the LoRA gradient wiring, shared by both VJP files.

    small_dot(lhs, rhs)         = lhs @ rhs             accumulated in float32
    small_dot(lhs, rhs, scale)  = scale * (lhs @ rhs)   accumulated in float32

Used for xa = scale * x @ a, g = scale * dy @ b.T, da = x.T @ g and db = xa.T @ dy:
products with one dimension of size r, cheap enough for a plain XLA dot. The
result stays float32; callers cast to the dtype they need.
"""

from __future__ import annotations

import jax.numpy as jnp


def small_dot(lhs, rhs, scale=None):
    """``lhs @ rhs`` with float32 accumulation, times ``scale`` when given."""
    acc = jnp.dot(lhs, rhs, preferred_element_type=jnp.float32)
    return acc if scale is None else scale * acc
