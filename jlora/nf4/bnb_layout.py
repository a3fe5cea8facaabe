"""NF4Tensor <-> the tensors transformers + bitsandbytes save for a 4-bit linear layer.

For a layer with prefix P, `save_pretrained` of a model loaded with
`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", ...)` writes (bitsandbytes
`QuantState.as_dict(packed=True)` behind `P.weight.`):

    P.weight                                 uint8 [(out * in + 1) // 2, 1]  packed codes
    P.weight.absmax                          uint8 [blocks] with double quant, else float32
    P.weight.quant_map                       float32 [16]   the NF4 code book
    P.weight.nested_absmax                   float32 [ceil(blocks / 256)]    (double quant)
    P.weight.nested_quant_map                float32 [256]  the dynamic map  (double quant)
    P.weight.quant_state.bitsandbytes__nf4   uint8 bytes of a JSON object: quant_type, blocksize,
                                             dtype, shape, and with double quant nested_blocksize,
                                             nested_dtype, nested_offset

The functions here take and give those tensors keyed by the suffix after `P.`.
"""
import json
import math

import jax.numpy as jnp
import numpy as np

from jlora.nf4.codebook import BLOCKSIZES
from jlora.nf4.codebook import NF4_CODE
from jlora.nf4.quantize import SUPPORTED_DTYPES
from jlora.nf4.tensor import NF4Tensor

WEIGHT = "weight"
ABSMAX = "weight.absmax"
QUANT_MAP = "weight.quant_map"
NESTED_ABSMAX = "weight.nested_absmax"
NESTED_QUANT_MAP = "weight.nested_quant_map"
QUANT_STATE_PREFIX = "weight.quant_state.bitsandbytes__"
QUANT_STATE = QUANT_STATE_PREFIX + "nf4"


def to_bnb_tensors(q: NF4Tensor) -> dict[str, np.ndarray]:
    """The suffix -> array dict transformers + bitsandbytes write for q, byte for byte."""
    state = {"quant_type": "nf4", "blocksize": q.blocksize, "dtype": q.dtype, "shape": list(q.shape)}
    tensors = {WEIGHT: np.asarray(q.codes).reshape(-1, 1), ABSMAX: np.asarray(q.absmax),
               QUANT_MAP: NF4_CODE.copy()}
    if q.double_quant:
        tensors[NESTED_ABSMAX] = np.asarray(q.nested_absmax)
        tensors[NESTED_QUANT_MAP] = np.asarray(q.nested_code)
        state.update(nested_blocksize=q.nested_blocksize, nested_dtype="float32",
                     nested_offset=float(np.asarray(q.offset)))
    tensors[QUANT_STATE] = np.frombuffer(json.dumps(state).encode("utf-8"), np.uint8).copy()
    return tensors


def _check(array: np.ndarray, key: str, dtype, size: int) -> np.ndarray:
    if array.dtype != dtype or array.size != size:
        raise ValueError(f"{key}: expected {np.dtype(dtype).name} with {size} elements, "
                         f"found {array.dtype.name} of shape {tuple(array.shape)}")
    return array.reshape(-1)


def _as_bytes(array: np.ndarray, key: str, size: int) -> np.ndarray:
    """The packed codes as uint8; a `bnb_4bit_quant_storage` other than uint8 holds the same bytes."""
    data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    if data.size != size:
        raise ValueError(f"{key}: expected {size} bytes of packed 4-bit codes, found "
                         f"{array.dtype.name} of shape {tuple(array.shape)} ({data.size} bytes)")
    return data


def _read_state(tensors: dict[str, np.ndarray]) -> dict:
    keys = [k for k in tensors if k.startswith("weight.quant_state")]
    if len(keys) != 1:
        raise ValueError(f"expected exactly one '{QUANT_STATE}' entry, found {keys or 'none'} "
                         f"among {sorted(tensors)}")
    kind = keys[0][len(QUANT_STATE_PREFIX):] if keys[0].startswith(QUANT_STATE_PREFIX) else keys[0]
    state = json.loads(bytes(np.asarray(tensors[keys[0]], np.uint8)).decode("utf-8"))
    quant_type = state.get("quant_type", kind)
    if kind != "nf4" or quant_type != "nf4":
        raise ValueError(f"{keys[0]}: quant_type {quant_type!r} is not supported; jlora reads only "
                         f"bitsandbytes 4-bit 'nf4' weights (bnb_4bit_quant_type='nf4')")
    return state


def from_bnb_tensors(tensors: dict[str, np.ndarray]) -> NF4Tensor:
    """NF4Tensor from the suffix -> array dict of a bitsandbytes NF4 layer (see module docstring).

    The nested code map and offset are taken from the tensors, not regenerated, so
    `to_bnb_tensors(from_bnb_tensors(t))` reproduces t exactly. Raises ValueError naming the key
    for fp4 or other quant types, a block size bitsandbytes does not allow, a code book other than
    NF4, a missing or unexpected key, or an array of the wrong dtype or size.
    """
    tensors = {k: np.asarray(v) for k, v in tensors.items()}
    state = _read_state(tensors)
    blocksize = state.get("blocksize")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"{QUANT_STATE}: blocksize {blocksize!r} is not one bitsandbytes allows "
                         f"{BLOCKSIZES}")
    if state.get("dtype") not in SUPPORTED_DTYPES:
        raise ValueError(f"{QUANT_STATE}: dtype {state.get('dtype')!r} is not supported; "
                         f"expected one of {SUPPORTED_DTYPES}")
    shape = tuple(state.get("shape") or ())
    if len(shape) != 2 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ValueError(f"{QUANT_STATE}: shape {state.get('shape')!r} is not a 2-D weight shape")
    double_quant = NESTED_ABSMAX in tensors or "nested_offset" in state
    expected = {WEIGHT, ABSMAX, QUANT_MAP, _quant_state_key(tensors)}
    if double_quant:
        expected |= {NESTED_ABSMAX, NESTED_QUANT_MAP}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(f"bitsandbytes NF4 tensors: missing {missing}, unexpected {extra}")

    size = math.prod(shape)
    blocks = -(-size // blocksize)
    codes = _as_bytes(tensors[WEIGHT], WEIGHT, (size + 1) // 2)
    quant_map = _check(tensors[QUANT_MAP], QUANT_MAP, np.float32, 16)
    if not np.array_equal(quant_map.view(np.uint32), NF4_CODE.view(np.uint32)):
        raise ValueError(f"{QUANT_MAP}: not the NF4 code book (found {quant_map.tolist()})")
    if double_quant:
        nested_blocksize = state.get("nested_blocksize")
        if not isinstance(nested_blocksize, int) or nested_blocksize <= 0:
            raise ValueError(f"{QUANT_STATE}: nested_blocksize {nested_blocksize!r} is not a positive int")
        if state.get("nested_dtype") != "float32" or "nested_offset" not in state:
            raise ValueError(f"{QUANT_STATE}: expected nested_dtype 'float32' and a nested_offset, "
                             f"found {state}")
        absmax = _check(tensors[ABSMAX], ABSMAX, np.uint8, blocks)
        nested_absmax = _check(tensors[NESTED_ABSMAX], NESTED_ABSMAX, np.float32,
                               -(-blocks // nested_blocksize))
        nested_code = _check(tensors[NESTED_QUANT_MAP], NESTED_QUANT_MAP, np.float32, 256)
        offset = np.float32(state["nested_offset"])
    else:
        nested_blocksize = 256
        absmax = _check(tensors[ABSMAX], ABSMAX, np.float32, blocks)
        nested_absmax = nested_code = np.zeros((0,), np.float32)
        offset = np.float32(0)
    return NF4Tensor(
        codes=jnp.asarray(codes), absmax=jnp.asarray(absmax), nested_absmax=jnp.asarray(nested_absmax),
        offset=jnp.asarray(offset), nested_code=jnp.asarray(nested_code), shape=shape,
        blocksize=blocksize, nested_blocksize=nested_blocksize, double_quant=double_quant,
        dtype=state["dtype"])


def _quant_state_key(tensors: dict[str, np.ndarray]) -> str:
    return next(k for k in tensors if k.startswith("weight.quant_state"))
