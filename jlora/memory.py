"""Bytes of a model by kind: the NF4 base, the dense base, the adapters, and the optimizer state.

    report = jlora.memory_report(model, opt_state)     # works on abstract models (nnx.eval_shape) too
    print(report)   # memory: NF4 base 3.35 GiB (4.127 bits/param) || bfloat16 base (embeddings, norms, head) ...
    report.bits_per_quantized_parameter                # 4 + 8/64 + 32/(64*256) = 4.127 with double quant

Counted from shapes and dtypes only (nothing is read or allocated); the total is for one copy of every
array, before any sharding divides it between devices.

This module is also the one source of the arithmetic the other two memory models share: the formula for
`jlora ranks` (jlora/ranks/memory.py) and the abstract-evaluation estimate of `jlora plan`
(jlora/plan/estimate.py) take these from here:

    array bytes            = prod(shape) * itemsize(dtype)
    NF4 bits per parameter = 4 + 8/blocksize + 32/(blocksize * nested_blocksize)   with double quant
                                                  (4.127 at 64 / 256, bitsandbytes' default)
                           = 4 + 32/blocksize                                      without (4.5 at 64)
    adapter + AdamW        = 4 (float32 A and B) + 8 (float32 mu and nu) = 12 bytes per trainable parameter
    during a train step    + 8: the float32 gradient accumulator and one micro-batch's float32 gradient
                             (jlora/train/step.py carries the accumulator even without accumulation)
"""
from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from flax import nnx

from jlora.lora_layer import LoRAParam
from jlora.nf4_weight import NF4Weight


ADAPTER_BYTES_PER_PARAM = 4          # float32 A and B
OPTIMIZER_BYTES_PER_PARAM = 8        # AdamW's mu and nu, float32
STEP_GRADIENT_BYTES_PER_PARAM = 8    # float32 gradient accumulator + one micro-batch's gradient


def nf4_bits_per_param(blocksize: int = 64, *, double_quant: bool = True, nested_blocksize: int = 256) -> float:
    """Storage bits per quantized weight: 4-bit codes, one absmax per block (uint8 codes plus one float32
    per nested block with double quantization, else float32), as bitsandbytes stores them."""
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * nested_blocksize)
    return 4 + 32 / blocksize


def dtype_bytes(dtype) -> int:
    """Bytes of one element: 2 for bfloat16 / float16, 4 for float32."""
    return np.dtype(dtype).itemsize


def array_bytes(shape, dtype) -> int:
    return math.prod(shape) * dtype_bytes(dtype)


def tree_bytes(tree) -> int:
    """Bytes of every array (concrete or abstract) in `tree`."""
    return sum(array_bytes(x.shape, x.dtype)
               for x in jax.tree.leaves(tree) if hasattr(x, "shape") and hasattr(x, "dtype"))


def format_bytes(n: float) -> str:
    """1536 -> '1.50 KiB'; 512 -> '512 B'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Bytes by kind.

    Attributes:
      quantized_base: NF4 storage of the quantized projections (packed codes, absmax, nested statistics).
      quantized_params: weights those projections hold (out * in each).
      dense_base: the frozen unquantized parameters: embeddings, norms, lm_head, biases, and any
        projection left dense.
      dense_dtypes: dtypes of the dense base, e.g. ("bfloat16",).
      adapters: LoRA A and B.
      optimizer_state: the optimizer state passed to `memory_report`, else None.
    """
    quantized_base: int
    quantized_params: int
    dense_base: int
    dense_dtypes: tuple[str, ...]
    adapters: int
    optimizer_state: int | None = None

    @property
    def total(self) -> int:
        return self.quantized_base + self.dense_base + self.adapters + (self.optimizer_state or 0)

    @property
    def bits_per_quantized_parameter(self) -> float:
        """8 * quantized_base / quantized_params (nan for a model without NF4 weights)."""
        return 8 * self.quantized_base / self.quantized_params if self.quantized_params else float("nan")

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "total": self.total,
                "bits_per_quantized_parameter": self.bits_per_quantized_parameter}

    def __str__(self) -> str:
        parts = []
        if self.quantized_params:
            parts.append(f"NF4 base {format_bytes(self.quantized_base)} "
                         f"({self.bits_per_quantized_parameter:.3f} bits/param)")
        dense = "/".join(self.dense_dtypes) or "dense"
        parts.append(f"{dense} base (embeddings, norms, head{'' if self.quantized_params else ', projections'}) "
                     f"{format_bytes(self.dense_base)}")
        parts.append(f"adapters {format_bytes(self.adapters)}")
        if self.optimizer_state is not None:
            parts.append(f"optimizer state {format_bytes(self.optimizer_state)}")
        return "memory: " + " || ".join(parts) + f" || total {format_bytes(self.total)}"


def memory_report(model: nnx.Module, opt_state=None) -> MemoryReport:
    """Bytes of `model` by kind (and of `opt_state`, any pytree of arrays, if given). Concrete or abstract."""
    quantized = [v.get_value() for _, v in nnx.to_flat_state(nnx.state(model, NF4Weight))]
    dense = nnx.state(model, nnx.All(nnx.Param, nnx.Not(LoRAParam)))
    dtypes = sorted({np.dtype(x.dtype).name for x in jax.tree.leaves(dense)})
    return MemoryReport(
        quantized_base=sum(q.nbytes for q in quantized),
        quantized_params=sum(q.size for q in quantized),
        dense_base=tree_bytes(dense),
        dense_dtypes=tuple(dtypes),
        adapters=tree_bytes(nnx.state(model, LoRAParam)),
        optimizer_state=None if opt_state is None else tree_bytes(opt_state),
    )
