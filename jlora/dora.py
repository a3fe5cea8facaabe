"""DoRA (weight-decomposed LoRA, arXiv 2402.09353) as PEFT's `LoraConfig(use_dora=True)` computes it.

A DoRA projection has a trainable magnitude m [out] beside A and B (torch orientation: W [out, in]):

    n  = || W + s B A ||_row      one L2 norm per output feature, over the input dim (PEFT's get_weight_norm),
                                  in float32, detached from the gradient (the paper's section 4.3)
    y  = (m / n) * (x W^T + s x A^T B^T) + b                                    (no dropout, or eval)
    y  = x W^T + b + (m / n - 1) * (d(x) W^T) + (m / n) * s d(x) A^T B^T         (training with dropout d)
    m0 = n at init, so a new adapter starts as plain LoRA
    merge: W' = (m / n) * (W + s B A)

W is the frozen weight in float32: a dense kernel cast up, an NF4 one dequantized to the dtype it was
quantized from and then cast up (PEFT's `dequantize_module_weight` + `.to(x.dtype)`, x in the adapters'
float32). PEFT saves m as `<module>.lora_magnitude_vector` ([out], float32).

At inference c = m / n is fixed: `inference_view(model)` computes it once per adapter (one jitted program over
every DoRA projection) and hangs it on the adapter as an `InferenceScale` (data, not a parameter), so a jitted
prefill / decode step reads c instead of recomputing s A B, W (dequantized), the sum and its norm every call;
jlora.generate splits every model this way (`inference_split`). Training never sees a view: its c is
recomputed, as the gradients of A, B and m need.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jlora.models.structure_cache import StructureCache
from jlora.nf4.dequantize import dequantize
from jlora.nf4.tensor import NF4Tensor

MAGNITUDE_KEY = "lora_magnitude_vector"  # PEFT's name for m in adapter_model.safetensors


def dense_weight(kernel) -> jax.Array:
    """The frozen weight as a float32 Flax kernel [in, out]; an NF4Tensor [out, in] dequantized as
    bitsandbytes does (to its own dtype, then float32)."""
    if isinstance(kernel, NF4Tensor):
        return dequantize(kernel, jnp.dtype(kernel.dtype)).astype(jnp.float32).T
    return jnp.asarray(kernel).astype(jnp.float32)


def column_norm(w: jax.Array) -> jax.Array:
    """||w[:, j]|| for a kernel [in, out]: the row norms of the torch weight [out, in]."""
    return jnp.sqrt(jnp.sum(jnp.square(w), axis=0))


def weight_norm(kernel, delta: jax.Array) -> jax.Array:
    """n = ||W + delta|| per output feature [out], float32, with no gradient to anything (PEFT detaches
    both the LoRA weight inside it and the norm itself). delta: s * A @ B [in, out], float32."""
    return jax.lax.stop_gradient(column_norm(dense_weight(kernel) + jax.lax.stop_gradient(delta)))


def scale(kernel, a: jax.Array, b: jax.Array, magnitude: jax.Array, scaling: float) -> jax.Array:
    """c = m / ||W + s A B|| [out], float32, the norm detached (A [in, r], B [r, out]; kernel as dense_weight)."""
    delta = scaling * (a.astype(jnp.float32) @ b.astype(jnp.float32))
    return magnitude.astype(jnp.float32) / weight_norm(kernel, delta)


class InferenceScale(nnx.Variable):
    """c = m / ||W + s A B|| [out] of one DoRA adapter, computed once by `inference_view`: carried through a
    jitted program as data (a new adapter of the same shapes reuses its compilation), never trained."""


def _dora_projections(model) -> list:
    """(path, module) of every projection with a DoRA adapter (a `lora` with a magnitude)."""
    return [(path, m) for path, m in nnx.iter_modules(model)
            if getattr(getattr(m, "lora", None), "magnitude", None) is not None]


@functools.partial(jax.jit, static_argnames="scalings")
def _scales(operands, scalings):
    out = []
    for (kernel, a, b, m), s in zip(operands, scalings):
        fn = functools.partial(scale, scaling=s)
        for _ in range(m.ndim - 1):  # scanned layers (jlora.models.stacked): every array has a leading layer axis
            fn = jax.vmap(fn)
        out.append(fn(kernel, a, b, m))
    return out


_VIEWS = StructureCache()  # graphdef -> (view graphdef, ((projection path, scaling), ...))


def _view_structure(graphdef, state) -> tuple:
    """(the view's graphdef, the (path, scaling) of each DoRA projection): built once per model structure."""
    view = nnx.merge(graphdef, state)
    found = _dora_projections(view)
    for _, m in found:  # placeholders: only the structure is kept
        m.lora.inference_scale = InferenceScale(jax.ShapeDtypeStruct(m.lora.magnitude.shape, jnp.float32))
    return (nnx.split(view)[0] if found else graphdef), tuple((path, m.lora.scaling) for path, m in found)


def inference_split(model) -> tuple:
    """`nnx.split(inference_view(model))` without building the view: (graphdef, state) of `model` with, for each
    DoRA adapter, c = m / ||W + s A B|| added to the state as an InferenceScale (one jitted program computes them
    all). The view's structure is cached per model structure, so a call costs a split and that program."""
    graphdef, state = nnx.split(model)
    view_graphdef, projections = _VIEWS.get(graphdef, lambda: _view_structure(graphdef, state))
    if not projections:
        return graphdef, state
    flat = dict(state.flat_state())
    operands = [tuple(flat[path + key].get_value() for key in (("kernel",), ("lora", "a"), ("lora", "b"),
                                                                ("lora", "magnitude"))) for path, _ in projections]
    scales = _scales(operands, scalings=tuple(scaling for _, scaling in projections))
    for (path, _), c in zip(projections, scales):
        flat[path + ("lora", "inference_scale")] = InferenceScale(c)
    return view_graphdef, nnx.State.from_flat_path(flat)


def inference_view(model):
    """`model` itself when it has no DoRA adapter; else a view of it for inference: a new module graph over the
    same arrays (`model` is unchanged) in which every DoRA adapter carries c = m / ||W + s A B|| as an
    InferenceScale, computed here once. The view is for forward passes of the weights as they are now: a
    change to A, B or m after it is made is not seen by its c."""
    if not _dora_projections(model):
        return model
    return nnx.merge(*inference_split(model))


def merge(kernel_f32: jax.Array, delta: jax.Array, magnitude: jax.Array) -> jax.Array:
    """PEFT's DoRA merge on a Flax kernel [in, out]: (m / ||W + delta||) * (W + delta), float32."""
    w = kernel_f32.astype(jnp.float32) + delta
    return w * (magnitude.astype(jnp.float32) / column_norm(w))[None, :]
