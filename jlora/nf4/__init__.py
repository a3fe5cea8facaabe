"""NF4 (4-bit NormalFloat) weights, stored bit-identically to bitsandbytes.

    q = jlora.nf4.quantize(w, blocksize=64, double_quant=True)   # w: [out, in], torch orientation
    w_hat = jlora.nf4.dequantize(q, jnp.bfloat16)
    tensors = jlora.nf4.to_bnb_tensors(q)                       # transformers' safetensors layout

The tensor type and its quantize / dequantize load with the package (the kernels need the type and
the decoding). The bitsandbytes file layout (`to_bnb_tensors`, `from_bnb_tensors`), used only by the
converters, loads on first use (PEP 562 `__getattr__`). `quantize` and `dequantize` stay eager: each
is also the name of a submodule, and the import system would rebind a lazily loaded name to the
submodule.
"""
import importlib

from jlora.nf4.codebook import BLOCKSIZES
from jlora.nf4.codebook import DYNAMIC_CODE
from jlora.nf4.codebook import NESTED_BLOCKSIZE
from jlora.nf4.codebook import NF4_CODE
from jlora.nf4.dequantize import dequantize
from jlora.nf4.quantize import quantize
from jlora.nf4.tensor import NF4Tensor

# Loaded on first use: public name -> the module that defines it.
_LAZY = {
    "from_bnb_tensors": "jlora.nf4.bnb_layout",
    "to_bnb_tensors": "jlora.nf4.bnb_layout",
}

__all__ = sorted(["BLOCKSIZES", "DYNAMIC_CODE", "NESTED_BLOCKSIZE", "NF4_CODE", "NF4Tensor",
                  "dequantize", "quantize", *_LAZY])


def __getattr__(name: str):
    """Loads a lazily exported name (the bitsandbytes layout) on first access."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
