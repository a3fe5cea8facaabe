"""Bytes of a model by kind: the NF4 base, the dense base, the adapters, and the optimizer state.

    report = jlora.memory_report(model, opt_state)     # works on abstract models (nnx.eval_shape) too
    print(report)   # memory: NF4 base 3.35 GiB (4.127 bits/param) || bfloat16 base (embeddings, norms, head) ...
    report.bits_per_quantized_parameter                # 4 + 8/64 + 32/(64*256) = 4.127 with double quant

Counted from shapes and dtypes only (nothing is read or allocated); the total is for one copy of every
array, before any sharding divides it between devices.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from flax import nnx

from jlora.lora_layer import LoRAParam
from jlora.nf4_weight import NF4Weight


def _nbytes(tree) -> int:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree) if hasattr(x, "shape") and hasattr(x, "dtype"))


def format_bytes(n: float) -> str:
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
        dense_base=_nbytes(dense),
        dense_dtypes=tuple(dtypes),
        adapters=_nbytes(nnx.state(model, LoRAParam)),
        optimizer_state=None if opt_state is None else _nbytes(opt_state),
    )
