"""quantize: a 2-D weight -> NF4Tensor, bit-identical to bitsandbytes' `quantize_4bit(quant_type="nf4")`.

For the flattened weight x, cut into blocks of `blocksize` (bitsandbytes' default torch kernel,
backends/default/ops.py, which is what runs on CPU):

    absmax[b] = max_j |x[b, j]|                                             (float32)
    s[b, j]   = clamp(x[b, j] * (1 / absmax[b]), -1, 1)     full blocks: reciprocal, then multiply
    s[last, j] = clamp(x[last, j] / absmax[last], -1, 1)    a partial last block: true division
    code      = #{k : NF4_BOUNDS[k] < s}     nearest NF4 value, a tie goes to the lower code
    byte      = code[2i] << 4 | code[2i + 1]

An all-zero block gets codes 7 (0.0) and absmax 0.0, except that a partial last block's absmax is
clamped to 1e-38 before it is stored, so an all-zero partial block stores absmax 1e-38 (a float32
subnormal, 0x006ce3ee). With `double_quant`, absmax is quantized further (double_quant.py).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jlora.nf4.codebook import BLOCKSIZES
from jlora.nf4.codebook import DYNAMIC_CODE
from jlora.nf4.codebook import NESTED_BLOCKSIZE
from jlora.nf4.codebook import NF4_BOUNDS
from jlora.nf4.double_quant import quantize_absmax
from jlora.nf4.tensor import NF4Tensor

# The bits of float32 1e-38 (a subnormal), the least absmax bitsandbytes stores for a partial block.
_TINY_BITS = np.float32(1e-38).view(np.uint32)

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")


def nf4_codes(s: jnp.ndarray) -> jnp.ndarray:
    """Index of the nearest NF4 value to each s in [-1, 1], ties to the lower one, as uint8.

    Counts the boundaries b with `not (s <= b)`, as torch.bucketize's search does, so NaN maps to 15.
    """
    code = jnp.zeros(s.shape, jnp.uint8)
    for b in NF4_BOUNDS:
        code = code + jnp.logical_not(s <= b).astype(jnp.uint8)
    return code


def pack_nibbles(codes: jnp.ndarray) -> jnp.ndarray:
    """uint8 codes [2m] -> uint8 bytes [m], the earlier code in the high nibble."""
    pairs = codes.reshape(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def _scaled_blocks(x: jnp.ndarray, blocksize: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Flat float32 x [n] -> (scaled values [n] in [-1, 1], absmax [ceil(n / blocksize)])."""
    n = x.shape[0]
    full = n - n % blocksize
    blocks = x[:full].reshape(-1, blocksize)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    # bitsandbytes: 1 / max(absmax, 1e-38); an all-zero block scales to 0 either way.
    reciprocal = 1.0 / jnp.where(absmax == 0, 1.0, absmax)
    scaled = jnp.clip(blocks * reciprocal[:, None], -1.0, 1.0).reshape(-1)
    if full == n:
        return scaled, absmax
    tail = x[full:]
    # bitsandbytes stores max(max |tail|, 1e-38). Clamped in the integer domain (non-negative
    # floats order like their bits): XLA on CPU treats the subnormal 1e-38 as 0 in float ops.
    tail_bits = jax.lax.bitcast_convert_type(jnp.max(jnp.abs(tail)), jnp.uint32)
    clamped = tail_bits < _TINY_BITS
    tail_absmax = jax.lax.bitcast_convert_type(jnp.where(clamped, _TINY_BITS, tail_bits), jnp.float32)
    tail_scaled = jnp.clip(tail / jnp.where(clamped, 1.0, tail_absmax), -1.0, 1.0)
    tail_scaled = jnp.where(clamped, 0.0, tail_scaled)
    return jnp.concatenate([scaled, tail_scaled]), jnp.concatenate([absmax, tail_absmax[None]])


@functools.partial(jax.jit, static_argnames=("blocksize", "double_quant"))
def _quantize(w: jax.Array, blocksize: int, double_quant: bool) -> NF4Tensor:
    x = w.reshape(-1).astype(jnp.float32)
    scaled, absmax = _scaled_blocks(x, blocksize)
    codes = nf4_codes(jnp.pad(scaled, (0, x.shape[0] % 2)))  # an odd count pads with 0.0 -> code 7
    if double_quant:
        absmax, nested_absmax, offset = quantize_absmax(absmax)
        nested_code = jnp.asarray(DYNAMIC_CODE)
    else:
        nested_absmax = jnp.zeros((0,), jnp.float32)
        offset = jnp.float32(0)
        nested_code = jnp.zeros((0,), jnp.float32)
    return NF4Tensor(
        codes=pack_nibbles(codes), absmax=absmax, nested_absmax=nested_absmax, offset=offset,
        nested_code=nested_code, shape=tuple(w.shape), blocksize=blocksize,
        nested_blocksize=NESTED_BLOCKSIZE, double_quant=double_quant, dtype=jnp.dtype(w.dtype).name)


def quantize(w: jax.Array | np.ndarray, blocksize: int = 64, double_quant: bool = True) -> NF4Tensor:
    """Quantize a weight to NF4, bit-identical to bitsandbytes' CPU `quantize_4bit`.

    Equals `bitsandbytes.functional.quantize_4bit(w, blocksize=blocksize, quant_type="nf4",
    compress_statistics=double_quant)` in every stored bit (see the module docstring for the
    math), except that blocks whose absmax is below ~1e-36 can differ because XLA on CPU flushes
    subnormal floats to zero. Deterministic; jittable (shapes and the two options are static).

    Args:
      w: [out_features, in_features] in torch orientation, float32, bfloat16 or float16.
      blocksize: weights per absmax block, one of 32, 64, ..., 4096 (bitsandbytes' set).
      double_quant: also quantize the absmax values (bitsandbytes' `compress_statistics`, QLoRA's
        double quantization): 4.127 instead of 4.5 bits per weight at blocksize 64.

    Example:
      >>> from jlora import nf4
      >>> q = nf4.quantize(jnp.ones((8, 64), jnp.bfloat16))
      >>> q.codes.shape, q.absmax.dtype, nf4.dequantize(q).shape
      ((256,), dtype('uint8'), (8, 64))
    """
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize={blocksize!r} is not supported: bitsandbytes' NF4 allows "
                         f"blocksize in {BLOCKSIZES}")
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {double_quant!r}")
    shape = getattr(w, "shape", None)
    dtype = getattr(w, "dtype", None)
    if shape is None or dtype is None:
        raise TypeError(f"w must be a jax or numpy array, got {type(w).__name__}")
    if len(shape) != 2:
        raise ValueError(f"w must be 2-D [out_features, in_features], got shape {tuple(shape)}")
    if 0 in shape:
        raise ValueError(f"w must not be empty, got shape {tuple(shape)}")
    if jnp.dtype(dtype).name not in SUPPORTED_DTYPES:
        raise ValueError(f"w has dtype {jnp.dtype(dtype).name}; NF4 quantization takes "
                         f"{', '.join(SUPPORTED_DTYPES)} (as bitsandbytes does): cast it first")
    return _quantize(w, blocksize=blocksize, double_quant=double_quant)
