"""dequantize: NF4Tensor -> dense [out_features, in_features] weight.

    absmax[b]  = nested_code[absmax[b]] * nested_absmax[b // 256] + offset    (double quant)
    W.flat[i]  = NF4_CODE[nibble i] * absmax[i // blocksize]                  (float32)
    W          = W.astype(dtype)                                              (round to nearest even)

Equal to bitsandbytes' `dequantize_4bit` in float32 and bfloat16 output, bit for bit, with the
blocks taken over the flattened weight as the CUDA kernel and bitsandbytes' torch kernel do (the
AVX-512 CPU kernel of bitsandbytes 0.50 mis-indexes absmax when in_features is not a multiple of
blocksize).
"""
import functools

import jax
import jax.numpy as jnp

from jlora.nf4.codebook import NF4_CODE
from jlora.nf4.double_quant import dequantize_absmax, dequantize_absmax_blocks
from jlora.nf4.tensor import NF4Tensor


def unpack_nibbles(packed: jnp.ndarray) -> jnp.ndarray:
    """uint8 bytes [m] -> uint8 codes [2m], the high nibble first."""
    return jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(-1)


def absmax_f32(q: NF4Tensor) -> jnp.ndarray:
    """The per-block float32 scales of q (dequantizing the nested statistics if present)."""
    if not q.double_quant:
        return q.absmax
    if q.absmax.shape[0] % q.nested_blocksize == 0:  # whole nested blocks: no pad, no slice
        nested = q.absmax.reshape(-1, q.nested_blocksize)
        return dequantize_absmax_blocks(nested, q.nested_absmax, q.offset, q.nested_code).reshape(-1)
    return dequantize_absmax(q.absmax, q.nested_absmax, q.offset, q.nested_code, q.nested_blocksize)


def tiles_rows(q: NF4Tensor) -> bool:
    """Whether every block lies inside one row (in_features % blocksize == 0) and every nested block
    holds whole absmax values (count % nested_blocksize == 0): then dequantize needs no pad or slice."""
    out, inn = q.shape
    blocks = q.size // q.blocksize
    return inn % q.blocksize == 0 and (not q.double_quant or blocks % q.nested_blocksize == 0)


def weight_from_codes(codes: jax.Array, absmax: jax.Array, *, shape: tuple[int, int], blocksize: int,
                      dtype) -> jax.Array:
    """W [out, in] in `dtype` from packed codes and float32 absmax: NF4_CODE[nibble] * absmax, then cast.

    When blocksize divides in_features the blocks tile the rows and the work is done on
    [out, in / blocksize, blocksize] views (only reshapes that split the leading axis): a weight whose
    flat codes are sharded over devices, whole rows each, dequantizes shard by shard. Otherwise blocks
    run over the flattened weight (pad, then slice), as bitsandbytes lays them out.
    """
    out, inn = shape
    if inn % blocksize == 0 and inn % 2 == 0:
        per_row = inn // blocksize
        packed = codes.reshape(out, inn // 2)
        nibbles = jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(out, per_row, blocksize)
        values = jnp.asarray(NF4_CODE)[nibbles.astype(jnp.int32)]
        return (values * absmax.reshape(out, per_row)[..., None]).reshape(out, inn).astype(dtype)
    n = out * inn
    blocks = absmax.shape[0]
    values = jnp.asarray(NF4_CODE)[unpack_nibbles(codes)[:n].astype(jnp.int32)]
    values = jnp.pad(values, (0, blocks * blocksize - n)).reshape(blocks, blocksize)
    return (values * absmax[:, None]).reshape(-1)[:n].reshape(shape).astype(dtype)


@functools.partial(jax.jit, static_argnames=("dtype",))
def _dequantize(q: NF4Tensor, dtype: jnp.dtype) -> jax.Array:
    return weight_from_codes(q.codes, absmax_f32(q), shape=q.shape, blocksize=q.blocksize, dtype=dtype)


def dequantize(q: NF4Tensor, dtype=jnp.bfloat16) -> jax.Array:
    """Dense weight [out_features, in_features] in `dtype`: NF4_CODE[code] * absmax in float32, then cast.

    Jittable; bit-identical to bitsandbytes' `dequantize_4bit(..., quant_type="nf4")` for float32 and
    bfloat16 outputs.

    Example:
      >>> from jlora import nf4
      >>> w = jnp.linspace(-1, 1, 128, dtype=jnp.float32).reshape(2, 64)
      >>> nf4.dequantize(nf4.quantize(w, double_quant=False), jnp.float32)[0, 0]
      Array(-1., dtype=float32)
    """
    if not isinstance(q, NF4Tensor):
        raise TypeError(f"dequantize takes an NF4Tensor, got {type(q).__name__}")
    return _dequantize(q, dtype=jnp.dtype(dtype))
