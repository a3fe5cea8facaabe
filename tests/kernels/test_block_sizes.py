"""BlockSizes: frozen, per-generation defaults, and fitting to shapes."""

import dataclasses

import pytest

from jlora.kernels import BlockSizes


def test_frozen_and_validated():
    bs = BlockSizes()
    with pytest.raises(dataclasses.FrozenInstanceError):
        bs.block_m = 8
    with pytest.raises(ValueError, match="block_k=0"):
        BlockSizes(block_k=0)
    assert hash(bs) == hash(BlockSizes())  # usable as a static jit argument


def test_get_default():
    assert BlockSizes.get_default("some unknown chip") == BlockSizes()
    assert BlockSizes.get_default("TPU v6 lite").block_n == 1024
    assert isinstance(BlockSizes.get_default(), BlockSizes)


@pytest.mark.parametrize("dim,block", [
    (4096, 512), (14336, 512), (11008, 256), (8192 + 128, 128), (200, 200),
    (512, 512), (1000, None), (4096 + 64, None)])
def test_fit_contraction_dims(dim, block):
    fitted = BlockSizes().fit(8192, dim, dim)
    if block is None:
        assert fitted is None
    else:
        assert (fitted.block_k, fitted.block_n, fitted.block_k_dx,
                fitted.block_n_dx) == (block,) * 4
        assert dim % block == 0


def test_fit_rows_clip_but_may_be_ragged():
    assert BlockSizes().fit(40, 512, 512).block_m == 40
    assert BlockSizes().fit(1000, 512, 512).block_m == 512  # 2 blocks, last ragged
