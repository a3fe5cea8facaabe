"""The LoRA adapter of one projection, numerically as PEFT's `lora.Linear`.

    y = x W + b + scaling * (dropout(x) A) B,     A [in, r], B [r, out]   (Flax orientation)

scaling = lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA (arXiv 2312.03732).
A and B are `LoRAParam`s stored in float32 (`param_dtype`); the rank-r path runs in their dtype
(x cast up, as PEFT does) and the sum with the frozen output is rounded to the compute dtype once.
Init as PEFT: True -> A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform, a=sqrt(5)), B = 0;
"gaussian" -> A ~ N(0, (1/r)^2), B = 0; False -> A as True and B ~ U(-1/sqrt(r), 1/sqrt(r)).

DoRA (`init_magnitude`, jlora/dora.py): a third LoRAParam, the magnitude m [out] = ||W + scaling B A||
per output feature at init; the projection (jlora.models.layers.Linear) then rescales its output by
m / ||W + scaling B A|| (the norm detached), as PEFT's `use_dora=True`; in an inference view
(`dora.inference_view`, what generation runs) that scale is precomputed data (`inference_scale`).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import LoRAParam

from jlora import dora

__all__ = ["LoRA", "LoRAParam", "lora_scaling"]


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def _uniform(key, shape, bound):
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


class LoRA(nnx.Module):
    """The low-rank update `scaling * dropout(x) @ A @ B` added to a frozen projection."""

    def __init__(self, in_features: int, out_features: int, r: int, *, scaling: float,
                 dropout: float = 0.0, init_weights: bool | str = True,
                 param_dtype=jnp.float32, rngs: nnx.Rngs, key: jax.Array | None = None):
        """key: the init key (default: drawn from rngs.params); get_peft_model passes the keys of
        successive draws, drawn at once (see peft_model._successive_keys)."""
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got r={r!r}")
        key_a, key_b = jax.random.split(rngs.params() if key is None else key)
        if init_weights is True or init_weights is False:
            a = _uniform(key_a, (in_features, r), 1.0 / math.sqrt(in_features))
        elif init_weights == "gaussian":
            a = jax.random.normal(key_a, (in_features, r), jnp.float32) / r
        else:
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {init_weights!r}")
        if init_weights is False:
            b = _uniform(key_b, (r, out_features), 1.0 / math.sqrt(r))
        else:
            b = jnp.zeros((r, out_features), jnp.float32)
        self.a = LoRAParam(a.astype(param_dtype))
        self.b = LoRAParam(b.astype(param_dtype))
        self.r = r
        self.scaling = float(scaling)
        self.dropout = nnx.data(nnx.Dropout(dropout, deterministic=True, rngs=rngs) if dropout > 0 else None)
        self.magnitude: LoRAParam | None = nnx.data(None)  # DoRA's m [out] (init_magnitude), float32
        self.inference_scale: dora.InferenceScale | None = nnx.data(None)  # m / ||W + sBA||, inference views only

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """scaling * (dropout(x) @ A) @ B [..., out], computed and returned in the adapters' dtype.

        As PEFT's `lora.Linear`: x is cast to A's dtype first (float32 adapters on a bf16 base run the
        rank-r path in float32), and the caller adds it to the frozen output before rounding to the
        compute dtype. The leading axes are folded into one row axis: XLA:CPU runs the gradient
        x^T @ g of a [batch, seq, in] activation several times slower than the same [rows, in] product.
        """
        *lead, k = x.shape
        y = self.low_rank(self.drop(x.reshape(-1, k)))
        return y.reshape(*lead, y.shape[-1])

    def drop(self, x: jnp.ndarray) -> jnp.ndarray:
        """x cast to the adapters' dtype, then LoRA dropout (when active)."""
        x = x.astype(self.a[...].dtype)
        return x if self.dropout is None else self.dropout(x)

    def low_rank(self, x: jnp.ndarray) -> jnp.ndarray:
        """scaling * (x @ A) @ B in the adapters' dtype, no dropout (rows folded as in __call__)."""
        a, b = self.a[...], self.b[...]
        *lead, k = x.shape
        x = x.reshape(-1, k).astype(a.dtype)
        y = ((x @ a) @ b.astype(a.dtype)) * jnp.asarray(self.scaling, a.dtype)
        return y.reshape(*lead, y.shape[-1])

    def delta_kernel(self) -> jnp.ndarray:
        """scaling * A @ B in float32: the update of the Flax kernel [in, out] (PEFT's B @ A transposed)."""
        return self.scaling * (self.a[...].astype(jnp.float32) @ self.b[...].astype(jnp.float32))

    def init_magnitude(self, kernel) -> None:
        """Makes this a DoRA adapter: m = ||W + scaling B A|| per output feature (PEFT's init; `kernel` the
        frozen [in, out] kernel or its NF4Tensor [out, in]), so it starts equal to plain LoRA."""
        if isinstance(kernel, jax.ShapeDtypeStruct):  # an abstract model (jlora.abstract_model)
            m = jax.ShapeDtypeStruct((self.b.get_value().shape[1],), jnp.float32)
        else:
            m = dora.weight_norm(kernel, self.delta_kernel())
        self.magnitude = LoRAParam(m)

    def dora_scale(self, kernel) -> jnp.ndarray:
        """m / ||W + scaling B A|| [out], float32, the norm detached (DoRA only); in an inference view, the
        value it was given (`dora.inference_view`) without recomputing anything."""
        if self.inference_scale is not None:
            return self.inference_scale[...]
        return dora.scale(kernel, self.a[...], self.b[...], self.magnitude[...], self.scaling)

    def merge_into(self, kernel_f32: jnp.ndarray) -> jnp.ndarray:
        """The merged Flax kernel [in, out] in float32: W + scaling A B, or with DoRA PEFT's
        (m / ||W + scaling A B||) * (W + scaling A B)."""
        if self.magnitude is None:
            return kernel_f32 + self.delta_kernel()
        return dora.merge(kernel_f32, self.delta_kernel(), self.magnitude[...])
