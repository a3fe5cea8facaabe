"""NF4Tensor: a weight stored the way bitsandbytes stores it, as a JAX pytree.

A weight W [out_features, in_features] (torch orientation) is flattened row-major and cut into
blocks of `blocksize` consecutive elements (the last block may be partial). Element j of block b
is stored as a 4-bit index into the NF4 code book, and

    W.flat[b * blocksize + j] = NF4_CODE[codes[b, j]] * absmax[b]          (float32, then cast)

With double quantization, absmax itself is stored as 8-bit indices into the dynamic map:

    absmax[b] = nested_code[absmax_codes[b]] * nested_absmax[b // 256] + offset

Arrays are pytree children (they trace through `jax.jit` and can sit in an `nnx.Variable`); the
shape, block sizes and original dtype are static aux data.
"""
import dataclasses
import math

import jax
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class NF4Tensor:
    """A frozen NF4-quantized 2-D weight (bitsandbytes layout; see the module docstring).

    Attributes:
      codes: uint8 [(out * in + 1) // 2]: two 4-bit codes per byte, the earlier element in the
        high nibble; an odd count pads the last low nibble with code 7 (0.0).
      absmax: per-block scale, [ceil(out * in / blocksize)]: uint8 indices into `nested_code`
        when `double_quant`, else float32.
      nested_absmax: float32 [ceil(len(absmax) / nested_blocksize)]; [0] without double quant.
      offset: float32 scalar, the mean of the float32 absmax; 0.0 without double quant.
      nested_code: float32 [256], bitsandbytes' signed dynamic map; [0] without double quant.
      shape: (out_features, in_features).
      blocksize: elements per absmax block.
      nested_blocksize: absmax values per nested_absmax block (256).
      double_quant: whether absmax is itself quantized.
      dtype: name of the dtype the weight was quantized from ("bfloat16", "float32", "float16").
    """

    codes: jax.Array
    absmax: jax.Array
    nested_absmax: jax.Array
    offset: jax.Array
    nested_code: jax.Array
    shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
    blocksize: int = dataclasses.field(default=64, metadata=dict(static=True))
    nested_blocksize: int = dataclasses.field(default=256, metadata=dict(static=True))
    double_quant: bool = dataclasses.field(default=True, metadata=dict(static=True))
    dtype: str = dataclasses.field(default="bfloat16", metadata=dict(static=True))

    @property
    def size(self) -> int:
        """Number of weights, out_features * in_features."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Storage bytes of all arrays (works on abstract arrays from `jax.eval_shape` too)."""
        arrays = (self.codes, self.absmax, self.nested_absmax, self.offset, self.nested_code)
        return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in arrays)

    @property
    def bits_per_parameter(self) -> float:
        """8 * nbytes / size: 4 + 8/64 + 32/(64*256) = 4.127 at blocksize 64 with double quant."""
        return 8 * self.nbytes / self.size

    def __repr__(self) -> str:
        # Static fields only: tree_map may have put anything in the array slots.
        return (f"NF4Tensor(shape={self.shape}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, dtype={self.dtype})")
