"""The 8-bit quantization of absmax values, against bitsandbytes' CPU quantize_blockwise."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora import nf4
from jlora.nf4.double_quant import dequantize_absmax
from jlora.nf4.double_quant import quantize_blockwise


def _hard_values(rng, n):
    """Values at, just below and just above every midpoint of the dynamic map, zeros, and ±1."""
    code = nf4.DYNAMIC_CODE
    mid = (np.float32(0.5) * (code[:-1] + code[1:])).astype(np.float32)
    near = np.concatenate([mid, np.nextafter(mid, np.float32(-2)), np.nextafter(mid, np.float32(2)),
                           code, np.zeros(8, np.float32), [1.0, -1.0]]).astype(np.float32)
    return rng.permutation(np.resize(near, n)).astype(np.float32)


@pytest.mark.parametrize("case", ["normal", "boundaries", "zero_block", "partial"])
def test_quantize_blockwise_matches_bitsandbytes(bnb, bits, case):
    rng = np.random.default_rng(1)
    y = {"normal": lambda: rng.standard_normal(1024),
         "boundaries": lambda: _hard_values(rng, 2048),
         "zero_block": lambda: np.concatenate([rng.standard_normal(256), np.zeros(256), rng.standard_normal(256)]),
         "partial": lambda: rng.standard_normal(600) * 1e-3}[case]().astype(np.float32)
    ref_codes, ref_state = bnb.F.quantize_blockwise(bnb.torch.from_numpy(y), blocksize=256)
    codes, absmax = jax.jit(quantize_blockwise)(y)
    np.testing.assert_array_equal(np.asarray(codes), ref_codes.numpy())
    np.testing.assert_array_equal(bits(absmax), bits(ref_state.absmax.numpy()))


def test_zero_maps_to_grid_neighbour_not_exact_zero_code(bnb):
    """bitsandbytes' CPU table rounds 0.0 to the code nearest +1/65535, not to code 127 (0.0)."""
    y = np.array([1.0, 0.0], np.float32)
    ref_codes, _ = bnb.F.quantize_blockwise(bnb.torch.from_numpy(y), blocksize=256)
    codes, _ = jax.jit(quantize_blockwise)(y)
    assert int(codes[1]) == int(ref_codes[1]) != 127


def test_dequantize_absmax_matches_bitsandbytes(bnb, bits):
    """code * nested_absmax rounded, then + offset rounded: no fused multiply-add."""
    rng = np.random.default_rng(2)
    y = (rng.standard_normal(700) * 0.01).astype(np.float32)
    offset = np.float32(0.0421)
    ref_codes, state = bnb.F.quantize_blockwise(bnb.torch.from_numpy(y), blocksize=256)
    expected = bnb.F.dequantize_blockwise(ref_codes, state) + bnb.torch.tensor(offset)
    got = jax.jit(dequantize_absmax)(jnp.asarray(ref_codes.numpy()), jnp.asarray(state.absmax.numpy()),
                                     jnp.float32(offset), jnp.asarray(nf4.DYNAMIC_CODE))
    np.testing.assert_array_equal(bits(got), bits(expected.numpy()))
