"""The building blocks of every decoder: Linear (frozen projection + optional LoRA), RMSNorm, Embedding, MLP.

Module and variable names mirror transformers' (`q_proj.kernel` is the HF `q_proj.weight`, transposed), so
converters and LoRA target matching use HF names directly.

    RMSNorm:  Llama  w * (x / sqrt(mean(x^2) + eps))           (normalised in float32, scaled in the dtype)
              Gemma  (offset + w) * (x / sqrt(mean(x^2) + eps)) (all in float32, then cast; offset = 1)
    MLP:      down(act(gate(x)) * up(x)),  act = silu | gelu_pytorch_tanh
"""
from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp

from flax import nnx

from jlora.kernels.dispatch import auto_impl
from jlora.kernels.mixed_dot import linear as mixed_linear
from jlora.lora_layer import LoRA
from jlora.models.config import ModelConfig
from jlora.models.fused import split_gate_up
from jlora.nf4 import NF4Tensor
from jlora.nf4_weight import nf4_matmul
from jlora.remat import projection_output

Dtype = jnp.dtype

# config.hidden_act -> the function (transformers' ACT2FN names; jlora.models.hf_fields.ACTIVATIONS lists them).
ACTIVATION = {
    "silu": jax.nn.silu,
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


# A new model's path: dense bases through lora_linear(impl="xla") (custom VJP over XLA dots: GSPMD-partitionable,
# fastest measured on CPU); NF4 bases through nf4_matmul + LoRA, whose dequantize is ordered so that only one
# layer's dense weight is alive at a time (the fused NF4 op's XLA path does not order it).
DEFAULT_KERNELS = "default"


def _dropout_active(lora: LoRA) -> bool:
    return lora.dropout is not None and not lora.dropout.deterministic


@functools.cache
def _warn_dropout_skips_kernels(impl: str, rate: float) -> None:
    """Once per (impl, rate): the Pallas/Triton kernels do not apply dropout, so those projections skip them."""
    if impl in (DEFAULT_KERNELS, "xla") or (impl == "auto" and auto_impl(False) == "xla"):
        return  # the XLA path with dropout is the same ops, split: nothing is lost
    warnings.warn(f"lora_dropout={rate}: the fused {impl!r} kernels do not apply dropout, so while training the "
                  f"adapted projections run as XLA ops instead (set lora_dropout=0 to use the kernels)",
                  stacklevel=3)


class Linear(nnx.Module):
    """A frozen projection `x @ kernel + bias` (kernel [in, out]) with an optional LoRA adapter.

    `kernel` is an `nnx.Param` [in, out], or after `jlora.quantize_model` an `NF4Weight` holding the
    weight in torch orientation [out, in] as bitsandbytes stores it (see jlora/qlora.py).

    Paths (`kernel_impl`, set by `use_kernels`):
    - DEFAULT_KERNELS (every backend and dtype): an adapted dense projection is one custom-VJP op
      (`jlora.kernels.lora_linear`, impl="xla": the frozen product and the rank-r path on 2-D rows, no
      dW); an unadapted one is `jlora.kernels.mixed_dot.linear` (16-bit operands stay native in the
      forward and input-gradient dots); an NF4 one is `nf4_matmul` + `LoRA.__call__`. With active LoRA
      dropout the frozen product and the adapter run as separate ops.
    - "auto" / "pallas" / "triton": the fused kernels for adapted projections (see jlora.kernels).
    - None: the plain jnp path, `x @ kernel + bias + lora(x)` by ordinary autodiff: the reference.
    Each rounds `frozen + low-rank` to the compute dtype once; the low-rank part is computed in the
    adapters' dtype (float32), as PEFT does (the Pallas/Triton kernels: in the compute dtype).
    A DoRA adapter (`lora.magnitude` set, jlora/dora.py) takes the same path and rescales its output
    by m / ||W + s A B|| (`_dora`; on the fused paths the op's output is rounded to the compute dtype
    before the float32 rescale, one rounding more than PEFT in 16-bit).
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, dtype: Dtype,
                 param_dtype: Dtype, init_std: float, rngs: nnx.Rngs):
        self.in_features, self.out_features = in_features, out_features
        kernel = jax.random.normal(rngs.params(), (in_features, out_features), jnp.float32) * init_std
        self.kernel = nnx.Param(kernel.astype(param_dtype))
        self.bias = nnx.data(nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None)
        self.dtype = dtype
        self.lora: LoRA | None = nnx.data(None)
        self.kernel_impl: str | None = DEFAULT_KERNELS  # `use_kernels`: auto | xla | pallas | triton | None
        self.kernel_mesh = None              # set by `use_kernels`: run the kernel per device over this mesh
        self.row_parallel = False            # o_proj / down_proj: input axis split over tensor

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = x.astype(self.dtype)
        kernel = self.kernel.get_value()
        path = self._path(kernel)
        if getattr(self.lora, "magnitude", None) is not None:  # DoRA (a MultiLoRA has no magnitude)
            return self._dora(x, kernel, path)
        if path == "fused":
            return self._fused(x, kernel)
        return self._unfused(x, kernel, self._dense_matmul(path))

    def _path(self, kernel) -> str:
        """How this call runs (warning once when LoRA dropout keeps it off the fused kernels):
        "plain" (kernel_impl None: the jnp reference), "fused" (one jlora.kernels op: adapted, no active dropout,
        not an NF4 kernel on DEFAULT_KERNELS) or "split" (the frozen product and the adapter as separate ops)."""
        impl = self.kernel_impl
        if impl is None:
            return "plain"
        if self.lora is None:
            return "split"
        if _dropout_active(self.lora):
            _warn_dropout_skips_kernels(impl, self.lora.dropout.rate)
            return "split"
        return "split" if impl == DEFAULT_KERNELS and isinstance(kernel, NF4Tensor) else "fused"

    def _dense_matmul(self, path: str):
        """x W for a dense kernel: plain jnp on the reference path, else jlora.kernels.mixed_dot.linear."""
        return (lambda x, w: x @ w.astype(x.dtype)) if path == "plain" else mixed_linear

    def _unfused(self, x: jnp.ndarray, kernel, dense_matmul) -> jnp.ndarray:
        """y = x W + b + lora(x) as separate ops; `dense_matmul(x, W)` is the product for a dense kernel."""
        y = self._frozen(x, kernel, dense_matmul)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora is not None:
            y = (y + self.lora(x)).astype(self.dtype)
        return y

    def _frozen(self, x: jnp.ndarray, kernel, dense_matmul) -> jnp.ndarray:
        """x W (no bias, no adapter) in x's dtype."""
        return nf4_matmul(x, kernel) if isinstance(kernel, NF4Tensor) else dense_matmul(x, kernel)

    def _dora(self, x: jnp.ndarray, kernel, path: str) -> jnp.ndarray:
        """DoRA as PEFT computes it (jlora/dora.py), with c = m / ||W + s A B|| [out] (the norm detached;
        precomputed data in an inference view, `jlora.dora.inference_view`), on the `path` plain LoRA takes:

            no active dropout:  y = c * (x W + s x A B) + b      x W + s x A B from the path plain LoRA takes
                                                                 (the fused kernels included), rescaled
            active dropout:     y = x W + b + (c - 1) * d(x) W + c * s d(x) A B     (d(x) W in float32)

        The rescale and the sum run in float32 and are rounded to the compute dtype once.
        """
        lora, f32 = self.lora, jnp.float32
        c = lora.dora_scale(kernel)
        dense = self._dense_matmul(path)
        if _dropout_active(lora):
            xd = lora.drop(x)  # float32, as PEFT's dropout(x.to(lora_A.dtype))
            dropped = self._frozen(xd, kernel, lambda x, w: x @ w.astype(x.dtype))
            y = self._frozen(x, kernel, dense).astype(f32) + (c - 1) * dropped + c * lora.low_rank(xd)
        elif path == "fused":
            y = c * self._fused(x, kernel, with_bias=False).astype(f32)
        else:
            y = c * (self._frozen(x, kernel, dense).astype(f32) + lora(x))
        if self.bias is not None:
            y = y + self.bias[...].astype(f32)
        return y.astype(self.dtype)

    def _fused(self, x: jnp.ndarray, kernel, with_bias: bool = True) -> jnp.ndarray:
        """The same y through jlora.kernels (frozen matmul and low-rank path in one op, no dW)."""
        from jlora import kernels

        a, b = self.lora.a[...], self.lora.b[...]
        impl = "xla" if self.kernel_impl == DEFAULT_KERNELS else self.kernel_impl
        op = kernels.nf4_lora_linear if isinstance(kernel, NF4Tensor) else kernels.lora_linear
        w = kernel if isinstance(kernel, NF4Tensor) else kernel.astype(self.dtype)
        mesh = self.kernel_mesh
        if mesh is not None and mesh.size > 1:
            from jlora.kernel_sharding import sharded_lora_linear
            y = sharded_lora_linear(op, x, w, a, b, scale=self.lora.scaling, impl=impl, mesh=mesh,
                                    row_parallel=self.row_parallel)
        else:
            y = op(x, w, a, b, scale=self.lora.scaling, impl=impl)
        if with_bias and self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    """(offset + weight) * (x / sqrt(mean(x^2) + eps)), normalised in float32 as transformers does.

    offset 0 (Llama, Qwen): the normalised x is cast to the dtype, then scaled by the weight in the dtype.
    offset != 0 (Gemma's `1 + w`, weight initialised to zeros): scaled in float32, then cast.
    """

    def __init__(self, features: int, *, eps: float, dtype: Dtype, param_dtype: Dtype, offset: float = 0.0):
        init = jnp.zeros if offset else jnp.ones
        self.weight = nnx.Param(init((features,), param_dtype))
        self.eps, self.dtype, self.offset = eps, dtype, float(offset)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (x32 * (self.offset + self.weight[...].astype(jnp.float32))).astype(self.dtype)
        return self.weight[...].astype(self.dtype) * x32.astype(self.dtype)


class Embedding(nnx.Module):
    def __init__(self, vocab: int, features: int, *, dtype: Dtype, param_dtype: Dtype, init_std: float,
                 rngs: nnx.Rngs):
        emb = jax.random.normal(rngs.params(), (vocab, features), jnp.float32) * init_std
        self.weight = nnx.Param(emb.astype(param_dtype))
        self.dtype = dtype

    def __call__(self, ids: jnp.ndarray) -> jnp.ndarray:
        h = jnp.take(self.weight[...], ids, axis=0)
        tokens = getattr(self, "tokens", None)  # trainable token rows (jlora.trainable_tokens)
        return (h if tokens is None else tokens.lookup(ids, h)).astype(self.dtype)

    def attend(self, x: jnp.ndarray) -> jnp.ndarray:
        """Tied output head: x @ weight^T (16-bit operands stay native, jlora.kernels.mixed_dot)."""
        z = mixed_linear(x, self.weight[...].astype(self.dtype), transpose_w=True)
        tokens = getattr(self, "tokens", None)
        return z if tokens is None else tokens.logits(x.astype(self.dtype), z, self.weight[...].dtype)


class MLP(nnx.Module):
    """down(act(gate(x)) * up(x)), act = ACTIVATION[config.hidden_act]."""

    def __init__(self, config: ModelConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        c = config
        kw = dict(use_bias=c.mlp_bias, dtype=dtype, param_dtype=param_dtype, init_std=c.initializer_range,
                  rngs=rngs)
        self.fused = c.fused_projections
        if self.fused:  # Phi-3: one projection, output gate | up (jlora.models.fused)
            self.gate_up_proj = Linear(c.hidden_size, 2 * c.intermediate_size, **kw)
        else:
            self.gate_proj = Linear(c.hidden_size, c.intermediate_size, **kw)
            self.up_proj = Linear(c.hidden_size, c.intermediate_size, **kw)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, **kw)
        self.hidden_act = c.hidden_act

    def __call__(self, x):
        if self.fused:
            gate, up = split_gate_up(projection_output(self.gate_up_proj(x)))
        else:
            gate, up = projection_output(self.gate_proj(x)), projection_output(self.up_proj(x))
        return projection_output(self.down_proj(ACTIVATION[self.hidden_act](gate) * up))


def use_kernels(model: nnx.Module, impl: str | None = "auto", *, mesh=None) -> nnx.Module:
    """Routes every adapted projection through `jlora.kernels` (`impl`: auto | xla | pallas | triton), or
    through the plain jnp reference path with None. A new model already runs DEFAULT_KERNELS;
    call this to force another backend. Projections with active LoRA dropout run their frozen product
    and adapter as separate XLA ops (a warning says so once when a Pallas/Triton kernel is skipped).

    mesh: the (data, fsdp, tensor) mesh the model trains on (jlora.train.sharding.make_mesh). Pallas and
    Triton kernels are opaque to XLA's partitioner, so on several devices each kernel runs per device
    under shard_map (jlora.kernel_sharding); without a mesh they need one device.
    """
    from jlora.kernels import IMPLS
    from jlora.mesh_axes import ROW_PARALLEL_MODULES

    if impl is not None and impl not in IMPLS:
        raise ValueError(f"kernel impl {impl!r} is not one of {list(IMPLS)} (or None for the plain path)")
    for path, module in nnx.iter_graph(model):
        if isinstance(module, Linear):
            module.kernel_impl = impl
            module.kernel_mesh = mesh
            module.row_parallel = bool(path) and path[-1] in ROW_PARALLEL_MODULES
    return model
