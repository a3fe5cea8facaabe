"""nf4_lora_linear rejects bad arguments with messages that name the shapes."""

import dataclasses
import functools
import re

import jax.numpy as jnp
import pytest

from jlora import kernels
from jlora import nf4
from jlora.kernels import BlockSizes

M, K, N, R = 16, 256, 128, 4


@functools.cache
def weight(n=N, k=K, blocksize=64):
    return nf4.quantize(jnp.ones((n, k), jnp.float32), blocksize=blocksize)


def args(x=(M, K), w=(N, K), a=(K, R), b=(R, N), dtype=jnp.float32):
    return (jnp.ones(x, dtype), weight(*w), jnp.ones(a, jnp.float32),
            jnp.ones(b, jnp.float32))


@pytest.mark.parametrize("kwargs,message", [
    (dict(x=(K,)), "x.shape=(256,) must be [M, K]"),
    (dict(w=(N, K + 256)), "w_nf4.shape=(128, 512) does not match x.shape=(16, 256): "
                           "expected [N, K=256] (torch orientation"),
    (dict(w=(K, N)), "w_nf4.shape=(256, 128) does not match x.shape=(16, 256)"),
    (dict(a=(K - 1, R)), "a.shape=(255, 4) does not match x.shape=(16, 256)"),
    (dict(a=(K, 0), b=(0, N)), "a.shape=(256, 0) has rank r=0"),
    (dict(b=(R + 1, N)), "b.shape=(5, 128) does not match a.shape=(256, 4) and "
                         "w_nf4.shape=(128, 256): expected [r=4, N=128]"),
    (dict(b=(R, N + 1)), "expected [r=4, N=128]"),
])
def test_shape_errors(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        kernels.nf4_lora_linear(*args(**kwargs), scale=1.0)


def test_inconsistent_nf4_tensor():
    x, q, a, b = args()
    bad = dataclasses.replace(q, codes=q.codes[:-2])
    with pytest.raises(ValueError, match=re.escape(
            "w_nf4.codes is uint8[16382], expected uint8[16384] for "
            "w_nf4.shape=(128, 256)")):
        kernels.nf4_lora_linear(x, bad, a, b, scale=1.0)
    bad = dataclasses.replace(q, absmax=q.absmax[:-1])
    with pytest.raises(ValueError, match=re.escape(
            "w_nf4.absmax.shape=(511,), expected (512,)")):
        kernels.nf4_lora_linear(x, bad, a, b, scale=1.0)


def test_type_errors():
    x, q, a, b = args()
    with pytest.raises(TypeError, match=re.escape(
            "w_nf4 must be a jlora.nf4.NF4Tensor, got an array of shape (128, 256); "
            "for a dense weight use lora_linear")):
        kernels.nf4_lora_linear(x, jnp.ones((N, K)), a, b, scale=1.0)
    with pytest.raises(TypeError, match=re.escape("x.dtype=int32 is not supported")):
        kernels.nf4_lora_linear(x.astype(jnp.int32), q, a, b, scale=1.0)
    with pytest.raises(TypeError, match=re.escape("a.dtype=int8 is not supported")):
        kernels.nf4_lora_linear(x, q, a.astype(jnp.int8), b, scale=1.0)
    with pytest.raises(TypeError, match="impl='pallas' supports"):
        kernels.nf4_lora_linear(x.astype(jnp.float16), q, a, b, scale=1.0,
                                impl="pallas", interpret=True)


def test_option_and_tile_errors():
    x, q, a, b = args()
    with pytest.raises(ValueError, match=re.escape("impl='cuda' is not one of")):
        kernels.nf4_lora_linear(x, q, a, b, scale=1.0, impl="cuda")
    with pytest.raises(ValueError, match="scale must be a scalar"):
        kernels.nf4_lora_linear(x, q, a, b, scale=jnp.ones(2))
    with pytest.raises(ValueError, match=re.escape(
            "block_k=128 must divide k=256 and be a multiple of 256 (lcm of 256 and "
            "blocksize=64)")):
        kernels.nf4_lora_linear(x, q, a, b, scale=1.0, impl="pallas", interpret=True,
                                block_sizes=BlockSizes(16, 128, 128, 16, 256, 128))
    with pytest.raises(ValueError, match=re.escape("block_n_dx=96 must divide n=128")):
        kernels.nf4_lora_linear(x, q, a, b, scale=1.0, impl="pallas", interpret=True,
                                block_sizes=BlockSizes(16, 128, 256, 16, 256, 96))
    with pytest.raises(ValueError, match="multiple of 128"):
        kernels.nf4_lora_linear(x, q, a, b, scale=1.0, impl="pallas",
                                block_sizes=BlockSizes(16, 64, 256, 16, 256, 64))
    # K = 320 is not a multiple of 256: Pallas cannot tile it, auto falls back.
    x320, q320, a320, b320 = args(x=(M, 320), w=(N, 320), a=(320, R))
    with pytest.raises(ValueError, match=re.escape(
            "impl='pallas' cannot tile m=16, k=320, n=128 with blocksize=64: K must be "
            "a multiple of 256")):
        kernels.nf4_lora_linear(x320, q320, a320, b320, scale=1.0, impl="pallas",
                                interpret=True)
    y = kernels.nf4_lora_linear(x320, q320, a320, b320, scale=1.0, interpret=True)
    assert y.shape == (M, N)
