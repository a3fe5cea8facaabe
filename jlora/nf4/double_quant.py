"""Double quantization: the float32 absmax values as 8-bit codes, as bitsandbytes does it on CPU.

    offset = mean(absmax)                                (torch's float32 CPU order: torch_mean.py)
    y = absmax - offset, cut into blocks of 256
    nested_absmax[c] = max |y| over block c
    t = clamp(y[i] * (1 / nested_absmax[c]), -1, 1)        (float32 reciprocal, then multiply)
    codes[i] = LUT[trunc(fma((t + 1) * 0.5, 65535, 0.5))]
    absmax[i] ~= DYNAMIC_CODE[codes[i]] * nested_absmax[c] + offset

bitsandbytes' CPU `quantize_blockwise` (csrc/cpu_ops.cpp, `quantize_cpu_impl`) does not search the
code book per value: it rounds the normalized value onto a grid of 65536 points over [-1, 1] and
reads the code index from a table built once per code book, where entry i is the nearest code to
-1 + 2i/65535 (ties to the lower code). So a value close to a code boundary can land on the
neighbouring code, and 0.0 maps to the code nearest to +1/65535 rather than to the exact 0.0
code. A block that is all zeros gets code 0 (-0.99, times a scale of 0) and nested_absmax 0.
"""
import functools

import jax.numpy as jnp
import numpy as np

from jlora.nf4.codebook import DYNAMIC_CODE
from jlora.nf4.codebook import NESTED_BLOCKSIZE
from jlora.nf4.torch_mean import torch_cpu_mean

LUT_SIZE = 65536


@functools.cache
def quantize_lut() -> np.ndarray:
    """uint8 [65536]: index of the nearest DYNAMIC_CODE value to the grid point -1 + 2i/65535.

    Built in float32 exactly as `build_quantize_lut`: midpoints 0.5f * (c[k] + c[k+1]), grid
    points (2.0f * i) / 65535.0f - 1.0f, and the index is the count of midpoints below the point.
    """
    f32 = np.float32
    mid = (f32(0.5) * (DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:])).astype(f32)
    grid = (f32(2) * np.arange(LUT_SIZE, dtype=f32)) / f32(LUT_SIZE - 1) - f32(1)
    lut = np.searchsorted(mid, grid.astype(f32), side="left").astype(np.uint8)
    lut.setflags(write=False)
    return lut


def _grid_index(t: jnp.ndarray) -> jnp.ndarray:
    """trunc(fma((t + 1) * 0.5, 65535, 0.5)) for float32 t in [-1, 1], exactly.

    bitsandbytes' binary computes that expression with one fused multiply-add. Here u = (t + 1) * 0.5
    is a multiple of 2**-25 in [0, 1], so u * 65536 and 0.5 - u are exact in float32 and their sum
    is that single rounding of u * 65535 + 0.5, whether or not XLA fuses the multiply.
    """
    u = (t + 1.0) * 0.5
    return (u * 65536.0 + (0.5 - u)).astype(jnp.int32)


def quantize_blockwise(y: jnp.ndarray,
                       blocksize: int = NESTED_BLOCKSIZE) -> tuple[jnp.ndarray, jnp.ndarray]:
    """bitsandbytes' CPU `quantize_blockwise(y, blocksize=...)` with the dynamic map, float32 y [n].

    Returns (uint8 codes [n], float32 absmax [ceil(n / blocksize)]).
    """
    n = y.shape[0]
    blocks = -(-n // blocksize)
    y_blocks = jnp.pad(y, (0, blocks * blocksize - n)).reshape(blocks, blocksize)
    absmax = jnp.max(jnp.abs(y_blocks), axis=1)
    zero = absmax == 0
    inv = 1.0 / jnp.where(zero, 1.0, absmax)
    t = jnp.clip(y_blocks * inv[:, None], -1.0, 1.0)
    codes = jnp.asarray(quantize_lut())[_grid_index(t)]
    codes = jnp.where(zero[:, None], jnp.uint8(0), codes)
    return codes.reshape(-1)[:n], absmax


def quantize_absmax(absmax: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """float32 absmax [n] -> (uint8 codes [n], float32 nested_absmax [ceil(n / 256)], offset)."""
    offset = torch_cpu_mean(absmax)
    codes, nested_absmax = quantize_blockwise(absmax - offset, NESTED_BLOCKSIZE)
    return codes, nested_absmax, offset


def dequantize_absmax(codes: jnp.ndarray, nested_absmax: jnp.ndarray, offset: jnp.ndarray,
                      nested_code: jnp.ndarray,
                      nested_blocksize: int = NESTED_BLOCKSIZE) -> jnp.ndarray:
    """uint8 codes [n] -> float32 absmax [n]: nested_code[codes] * nested_absmax + offset.

    bitsandbytes rounds the product to float32 before adding the offset. XLA contracts a multiply
    followed by an add into one fused multiply-add (one rounding); the select on the product
    (a no-op for non-NaN values) keeps the two roundings apart.
    """
    n = codes.shape[0]
    blocks = nested_absmax.shape[0]
    codes = jnp.pad(codes, (0, blocks * nested_blocksize - n)).reshape(blocks, nested_blocksize)
    return dequantize_absmax_blocks(codes, nested_absmax, offset, nested_code).reshape(-1)[:n]


def dequantize_absmax_blocks(codes: jnp.ndarray, nested_absmax: jnp.ndarray, offset: jnp.ndarray,
                             nested_code: jnp.ndarray) -> jnp.ndarray:
    """uint8 codes [blocks, nested_blocksize] -> float32 absmax of the same shape (see dequantize_absmax)."""
    product = nested_code[codes.astype(jnp.int32)] * nested_absmax[:, None]
    product = jnp.where(product == product, product, 0.0)
    return product + offset
