"""QLoRA: projection kernels stored frozen in NF4 (bitsandbytes' layout), LoRA adapters trained on top.

    model = jlora.quantize_model(jlora.init_random(cfg))                 # the 7 projections of each layer
    model = jlora.load_hf("path/to/llama", quantize="nf4", dtype="bfloat16")   # the same, while loading

A quantized `Linear` holds `kernel = NF4Weight(NF4Tensor)`, the weight in torch orientation
[out, in], and computes what bitsandbytes' `Linear4bit` computes (arXiv 2305.14314):

    W = dequantize(q, q.dtype).astype(compute dtype)        # q.dtype: the dtype it was quantized from
    y = x @ W^T + b + scaling * (x A) B

`NF4Weight` is an `nnx.Variable` but not an `nnx.Param`: `nnx.split(model, LoRAParam, ...)` leaves it
in the frozen state, optimizers built `wrt=LoRAParam` (or `nnx.Param`) never see it, and nothing
differentiates it. The backward pass of the matmul (`nf4_matmul`, a custom VJP) dequantizes again
instead of keeping every layer's dense weight alive between forward and backward, so a train step
holds the 4-bit base plus about one dense weight at a time, as bitsandbytes' `MatMul4Bit` does.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jlora import nf4
from jlora.nf4 import NF4Tensor

QUANTIZE_METHODS = ("nf4",)


class NF4Weight(nnx.Variable):
    """Frozen NF4 storage of a projection weight: an `NF4Tensor` [out, in]. Never trained, never a Param."""


@dataclasses.dataclass(frozen=True)
class NF4Config:
    """How to quantize a base model: bitsandbytes' `bnb_4bit_quant_type="nf4"` options.

    Attributes:
      blocksize: weights per absmax block, one of bitsandbytes' 32, 64, ..., 4096 (its default 64).
      double_quant: also quantize the absmax values (`bnb_4bit_use_double_quant`): 4.127 instead of
        4.5 bits per weight at blocksize 64.
    """
    blocksize: int = 64
    double_quant: bool = True

    def __post_init__(self):
        if self.blocksize not in nf4.BLOCKSIZES:
            raise ValueError(f"blocksize={self.blocksize!r} is not supported: bitsandbytes' NF4 allows "
                             f"blocksize in {nf4.BLOCKSIZES}")
        if not isinstance(self.double_quant, bool):
            raise TypeError(f"double_quant must be a bool, got {self.double_quant!r}")


def nf4_config(quantize) -> NF4Config | None:
    """`quantize=` of `load_hf` / `jlora train` -> NF4Config: None, "nf4" or an NF4Config."""
    if quantize is None or isinstance(quantize, NF4Config):
        return quantize
    if isinstance(quantize, str) and quantize.lower() in QUANTIZE_METHODS:
        return NF4Config()
    raise ValueError(f"quantize={quantize!r} is not supported; jlora quantizes to {list(QUANTIZE_METHODS)} "
                     f"(bitsandbytes NF4; pass jlora.NF4Config(blocksize=..., double_quant=...) for other options)")


def is_quantized(linear) -> bool:
    return isinstance(linear.kernel, NF4Weight)


def _dense(q: NF4Tensor, dtype) -> jax.Array:
    """The weight [out, in] as bitsandbytes' Linear4bit uses it: dequantized to q.dtype, cast to dtype."""
    return nf4.dequantize(q, jnp.dtype(q.dtype)).astype(dtype)


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


def quantize_linear(linear, *, blocksize: int = 64, double_quant: bool = True) -> None:
    """Replaces `linear.kernel` [in, out] with `NF4Weight(nf4.quantize(kernel^T))`; a no-op if already NF4.

    An abstract kernel (a `jax.ShapeDtypeStruct`, e.g. from `jlora.abstract_model`) gets an abstract
    NF4Tensor of the right shapes.
    """
    if is_quantized(linear):
        return
    kernel = linear.kernel.get_value()
    quantize = functools.partial(nf4.quantize, blocksize=blocksize, double_quant=double_quant)
    if isinstance(kernel, jax.ShapeDtypeStruct):
        q = jax.eval_shape(lambda w: quantize(w.T), kernel)
    else:
        q = quantize(kernel.T)
    linear.kernel = NF4Weight(q)


def quantize_model(model, *, blocksize: int = 64, double_quant: bool = True):
    """Quantizes the 7 projections of every decoder layer to NF4, in place, and returns the model.

    q/k/v/o and gate/up/down become `NF4Weight`s, bit-identical to bitsandbytes' `quantize_4bit` of
    the torch-orientation weight in the kernel's dtype (what transformers' `load_in_4bit` stores).
    Embeddings, norms and lm_head stay dense, as transformers + bitsandbytes keep them. LoRA adapters
    are left as they are. Works on concrete models, abstract ones (`jlora.abstract_model`) and inside
    `nnx.eval_shape`:

        abstract = nnx.eval_shape(lambda: jlora.quantize_model(jlora.init_random(cfg)))
        jlora.memory_report(abstract).quantized_base      # bytes of the NF4 base, nothing allocated

    Args:
      model: a `LlamaForCausalLM`.
      blocksize: weights per absmax block, one of 32, 64, ..., 4096 (bitsandbytes' set).
      double_quant: also quantize the absmax values (4.127 bits per weight at blocksize 64).
    """
    from jlora.peft_model import linear_modules  # peft_model imports llama, which this module serves

    NF4Config(blocksize, double_quant)  # validates both
    for _, linear in linear_modules(model):
        quantize_linear(linear, blocksize=blocksize, double_quant=double_quant)
    return model
