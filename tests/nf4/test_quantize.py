"""quantize / dequantize against bitsandbytes' quantize_4bit / dequantize_4bit on CPU, bit for bit."""
import itertools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jlora import nf4
from jlora.nf4.dequantize import tiles_rows

# 37 * 301 = 11137 weights: odd (a padding nibble), a partial last block at every block size, and
# 349 blocks at blocksize 32 (two nested blocks, the second partial). Flat block 1 is all zeros.
SHAPE = (37, 301)
TABLE = list(itertools.product(nf4.BLOCKSIZES, [True, False], ["float32", "bfloat16"]))


def weight(shape, dtype, seed=0, zero_block=None):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    w.reshape(-1)[: max(1, w.size // 50)] *= 40  # some blocks with larger absmax
    if zero_block is not None:
        w.reshape(-1)[zero_block[0]: zero_block[1]] = 0
    return w.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)


def assert_same_as_bnb(q, packed, state, bits):
    np.testing.assert_array_equal(np.asarray(q.codes), packed.numpy().reshape(-1))
    np.testing.assert_array_equal(bits(q.absmax), bits(state.absmax.numpy()))
    assert q.double_quant == state.nested
    if state.nested:
        np.testing.assert_array_equal(bits(q.nested_absmax), bits(state.state2.absmax.numpy()))
        assert bits(q.offset) == bits(state.offset.numpy())
        np.testing.assert_array_equal(bits(q.nested_code), bits(state.state2.code.numpy()))
    assert q.shape == tuple(state.shape) and q.blocksize == state.blocksize
    assert q.dtype == str(state.dtype).removeprefix("torch.")


@pytest.mark.parametrize("blocksize,double_quant,dtype", TABLE)
def test_matches_bitsandbytes(bnb, bits, blocksize, double_quant, dtype):
    w = weight(SHAPE, dtype, seed=blocksize, zero_block=(blocksize, 2 * blocksize))
    packed, state = bnb.quantize(w, blocksize, double_quant)
    q = nf4.quantize(w, blocksize=blocksize, double_quant=double_quant)
    assert_same_as_bnb(q, packed, state, bits)
    # Dequantized to the input's dtype here; both output dtypes from one input are checked below.
    got = nf4.dequantize(q, jnp.dtype(dtype))
    assert got.shape == SHAPE and got.dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(bits(got), bits(bnb.dequantize(packed, state, getattr(bnb.torch, dtype))))


@pytest.mark.parametrize("shape,blocksize", [((3, 40), 64), ((1, 1), 32), ((1, 3), 64), ((2, 4095), 4096)])
def test_all_zero_partial_block_stores_1e_38(bnb, bits, shape, blocksize):
    """bitsandbytes clamps a partial block's absmax to 1e-38 and stores the clamped value."""
    w = weight(shape, "float32", zero_block=(shape[0] * shape[1] // blocksize * blocksize, None))
    packed, state = bnb.quantize(w, blocksize, False)
    q = nf4.quantize(w, blocksize=blocksize, double_quant=False)
    assert_same_as_bnb(q, packed, state, bits)
    assert np.asarray(q.absmax)[-1] == np.float32(1e-38)
    assert np.all(np.asarray(nf4.dequantize(q, jnp.float32)).reshape(-1)[-(w.size % blocksize):] == 0)


def test_constant_weight_has_all_zero_nested_block(bnb, bits):
    """Equal absmax everywhere: absmax - offset is 0, the nested block stores code 0 and scale 0."""
    w = np.full((8, 128), 0.5, np.float32)
    packed, state = bnb.quantize(w, 64, True)
    q = nf4.quantize(w, blocksize=64, double_quant=True)
    assert_same_as_bnb(q, packed, state, bits)
    np.testing.assert_array_equal(bits(nf4.dequantize(q, jnp.float32)), bits(w))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matches_bitsandbytes_public_dequantize(bnb, bits, dtype):
    """bnb's public dequantize_4bit (its AVX-512 CPU kernel when the CPU has one) on a shape it
    handles, to float32 and to bfloat16 from the same input."""
    w = weight((64, 256), dtype, seed=3)
    packed, state = bnb.quantize(w, 64, True)
    q = nf4.quantize(w, blocksize=64)
    for out_dtype in ["float32", "bfloat16"]:
        state.dtype = getattr(bnb.torch, out_dtype)
        expected = bnb.to_numpy(bnb.F.dequantize_4bit(packed, state))
        np.testing.assert_array_equal(bits(nf4.dequantize(q, jnp.dtype(out_dtype))), bits(expected))


def test_float16_input(bnb, bits):
    w = weight((24, 80), "float32", seed=7).astype(np.float16)
    packed, state = bnb.quantize(w, 128, True)
    q = nf4.quantize(w, blocksize=128, double_quant=True)
    assert_same_as_bnb(q, packed, state, bits)
    np.testing.assert_array_equal(bits(nf4.dequantize(q, jnp.float16)),
                                  bits(bnb.dequantize(packed, state, bnb.torch.float16)))


def test_nan_and_inf_blocks_match_bitsandbytes(bnb, bits):
    w = weight((4, 64), "float32", seed=4)
    w[1, 5], w[2, 7] = np.nan, np.inf
    packed, state = bnb.quantize(w, 64, False)
    assert_same_as_bnb(nf4.quantize(w, blocksize=64, double_quant=False), packed, state, bits)


def test_deterministic_and_same_under_an_outer_jit(bits):
    w = weight((48, 96), "bfloat16", seed=5)
    a = nf4.quantize(w)
    b = nf4.quantize(jnp.asarray(w))
    c = jax.jit(lambda x: nf4.quantize(x, blocksize=64, double_quant=True))(w)
    for x, y in [(a, b), (a, c)]:
        for leaf_x, leaf_y in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
            np.testing.assert_array_equal(bits(leaf_x), bits(leaf_y))
    d = jax.jit(lambda q: nf4.dequantize(q, jnp.float32) * 1.0)(a)
    np.testing.assert_array_equal(bits(d), bits(nf4.dequantize(a, jnp.float32)))


def test_error_is_at_most_half_a_code_gap():
    """A property independent of bitsandbytes: each weight lands on a nearest code of its block."""
    w = weight((64, 128), "float32", seed=6)
    q = nf4.quantize(w, blocksize=64, double_quant=False)
    err = np.abs(np.asarray(nf4.dequantize(q, jnp.float32)) - w).reshape(-1, 64)
    absmax = np.abs(w).reshape(-1, 64).max(axis=1, keepdims=True)
    half_gap = np.max(np.diff(nf4.NF4_CODE)) / 2
    assert np.all(err <= absmax * half_gap * (1 + 1e-6))


@pytest.mark.parametrize("double_quant,expected", [(True, 4 + 8 / 64 + 32 / (64 * 256)), (False, 4 + 32 / 64)])
def test_storage_bits_per_parameter(double_quant, expected):
    """4 + 8/64 + 32/(64*256) = 4.127 bits per weight with double quant, 4.5 without (4096 x 4096)."""
    q = jax.eval_shape(lambda w: nf4.quantize(w, blocksize=64, double_quant=double_quant),
                       jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16))
    assert q.codes.shape == (4096 * 4096 // 2,)
    assert q.bits_per_parameter == pytest.approx(expected, abs=1e-3)  # + the 256-entry map, offset
    if double_quant:
        assert q.bits_per_parameter <= 4.13


@pytest.mark.parametrize("bad,match", [
    (dict(w=np.ones((4, 64), np.float64)), "float64"),
    (dict(w=np.ones((4, 64), np.int32)), "int32"),
    (dict(w=np.ones((2, 4, 64), np.float32)), "2-D"),
    (dict(w=np.ones((0, 64), np.float32)), "empty"),
    (dict(w=[[1.0, 2.0]]), "array"),
    (dict(w=np.ones((4, 64), np.float32), blocksize=100), r"blocksize=100 .*\(32, 64"),
    (dict(w=np.ones((4, 64), np.float32), double_quant=1), "bool"),
])
def test_bad_input(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        nf4.quantize(**bad)


def test_dequantize_rejects_non_nf4():
    with pytest.raises(TypeError, match="NF4Tensor"):
        nf4.dequantize(np.ones((2, 2)))


@pytest.mark.parametrize("shape,blocksize,double_quant", [((64, 256), 64, True), ((128, 512), 32, True),
                                                          ((24, 128), 64, False), ((8, 4096), 4096, False)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_row_tiled_weights_match_bitsandbytes(bnb, bits, shape, blocksize, double_quant, dtype):
    """Shapes whose blocks tile the rows take dequantize's row-wise path (no pad, no flat slice)."""
    w = weight(shape, dtype, seed=shape[0])
    packed, state = bnb.quantize(w, blocksize, double_quant)
    q = nf4.quantize(w, blocksize=blocksize, double_quant=double_quant)
    assert tiles_rows(q)
    for out in ("float32", "bfloat16"):
        got = nf4.dequantize(q, jnp.dtype(out))
        np.testing.assert_array_equal(bits(got), bits(bnb.dequantize(packed, state, getattr(bnb.torch, out))))
