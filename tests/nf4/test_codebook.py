"""The code books and block sizes, against bitsandbytes' own."""
import numpy as np
import pytest

from jlora import nf4
from jlora.nf4.codebook import NF4_BOUNDS


def test_nf4_code_is_bitsandbytes(bnb, bits):
    ref = bnb.F.get_4bit_type("nf4", device="cpu").numpy()
    np.testing.assert_array_equal(bits(nf4.NF4_CODE), bits(ref))


def test_bounds_are_sorted_midpoints():
    assert np.all(np.diff(NF4_BOUNDS) > 0)
    assert np.all((NF4_BOUNDS > nf4.NF4_CODE[:-1]) & (NF4_BOUNDS < nf4.NF4_CODE[1:]))


def test_dynamic_code_is_bitsandbytes(bnb, bits):
    ref = bnb.F.create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8).numpy()
    np.testing.assert_array_equal(bits(nf4.DYNAMIC_CODE), bits(ref))
    assert nf4.DYNAMIC_CODE[127] == 0.0 and nf4.DYNAMIC_CODE[-1] == 1.0


@pytest.mark.parametrize("blocksize", [16, 48, 8192])
def test_blocksizes_mirror_bitsandbytes(bnb, blocksize):
    """Exactly the sizes bitsandbytes accepts: a size outside BLOCKSIZES is refused by both."""
    w = np.ones((4, 64), np.float32)
    assert blocksize not in nf4.BLOCKSIZES
    with pytest.raises(ValueError, match="blocksize"):
        bnb.quantize(w, blocksize, False)
    with pytest.raises(ValueError, match=f"blocksize={blocksize}"):
        nf4.quantize(w, blocksize=blocksize)


def test_every_allowed_blocksize_is_accepted_by_bitsandbytes(bnb):
    w = np.ones((4, 64), np.float32)
    for blocksize in nf4.BLOCKSIZES:
        bnb.quantize(w, blocksize, False)
