"""lora_linear rejects bad arguments with messages that name the shapes."""

import re

import jax.numpy as jnp
import pytest

from jlora import kernels
from jlora.kernels import BlockSizes

M, K, N, R = 16, 64, 32, 4


def args(x=(M, K), w=(K, N), a=(K, R), b=(R, N), dtype=jnp.float32):
    return (jnp.ones(x, dtype), jnp.ones(w, dtype), jnp.ones(a, jnp.float32),
            jnp.ones(b, jnp.float32))


@pytest.mark.parametrize("kwargs,message", [
    (dict(x=(K,)), "x.shape=(64,) must be [M, K]"),
    (dict(w=(K + 1, N)), "w.shape=(65, 32) does not match x.shape=(16, 64)"),
    (dict(w=(K, N, 1)), "w.shape=(64, 32, 1) does not match"),
    (dict(a=(K - 1, R)), "a.shape=(63, 4) does not match x.shape=(16, 64)"),
    (dict(a=(K, 0), b=(0, N)), "a.shape=(64, 0) has rank r=0"),
    (dict(b=(R + 1, N)), "b.shape=(5, 32) does not match a.shape=(64, 4) and "
                         "w.shape=(64, 32): expected [r=4, N=32]"),
    (dict(b=(R, N + 1)), "expected [r=4, N=32]"),
])
def test_shape_errors(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        kernels.lora_linear(*args(**kwargs), scale=1.0)


def test_dtype_errors():
    x, w, a, b = args()
    with pytest.raises(TypeError, match=re.escape("x.dtype=int32 is not supported")):
        kernels.lora_linear(x.astype(jnp.int32), w, a, b, scale=1.0)
    with pytest.raises(TypeError, match=re.escape("w.dtype=int8 is not supported")):
        kernels.lora_linear(x, w.astype(jnp.int8), a, b, scale=1.0)
    with pytest.raises(TypeError, match="impl='pallas' supports"):
        kernels.lora_linear(x.astype(jnp.float16), w, a, b, scale=1.0,
                            impl="pallas", interpret=True)


def test_option_errors():
    x, w, a, b = args()
    with pytest.raises(ValueError, match=re.escape("impl='cuda' is not one of")):
        kernels.lora_linear(x, w, a, b, scale=1.0, impl="cuda")
    with pytest.raises(ValueError, match="scale must be a scalar"):
        kernels.lora_linear(x, w, a, b, scale=jnp.ones(2))
    with pytest.raises(ValueError, match=re.escape("block_k=48 must divide k=64")):
        kernels.lora_linear(x, w, a, b, scale=1.0, impl="pallas", interpret=True,
                            block_sizes=BlockSizes(32, 32, 48, 32, 32, 32))
    with pytest.raises(ValueError, match=re.escape("block_n_dx=64 must divide n=32")):
        kernels.lora_linear(x, w, a, b, scale=1.0, impl="pallas", interpret=True,
                            block_sizes=BlockSizes(32, 32, 32, 32, 32, 64))
    with pytest.raises(ValueError, match="multiple of 128"):
        kernels.lora_linear(x, w, a, b, scale=1.0, impl="pallas",
                            block_sizes=BlockSizes(16, 16, 32, 16, 32, 16))
