"""QLoRA: projection kernels stored frozen in NF4 (bitsandbytes' layout), LoRA adapters trained on top.

    model = jlora.quantize_model(jlora.init_random(cfg))                 # the 7 projections of each layer
    model = jlora.load_hf("path/to/llama", quantize="nf4", dtype="bfloat16")   # the same, while loading

Quantizing replaces a projection's dense kernel [in, out] with `NF4Weight(NF4Tensor)` [out, in], the
frozen weight that jlora.nf4_weight defines together with its matmul (`nf4_matmul`, as bitsandbytes'
`Linear4bit`); both are re-exported here. The model (jlora.llama) needs only jlora.nf4_weight, so
this module can import the model (`linear_modules`) without a cycle.
"""
from __future__ import annotations

import dataclasses
import functools

import jax

from jlora import nf4
from jlora.nf4_weight import NF4Weight
from jlora.nf4_weight import nf4_matmul  # noqa: F401  (re-exported: jlora.qlora.nf4_matmul)
from jlora.models.stacked import on_loop_model
from jlora.peft_model import linear_modules

QUANTIZE_METHODS = ("nf4",)


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


@on_loop_model  # a scanned model: unstacked for the writes, stacked again (jlora.models.stacked)
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
    NF4Config(blocksize, double_quant)  # validates both
    for _, linear in linear_modules(model):
        quantize_linear(linear, blocksize=blocksize, double_quant=double_quant)
    return model
