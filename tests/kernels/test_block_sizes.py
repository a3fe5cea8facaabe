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


@pytest.mark.parametrize("m,k,n,blocksize,itemsize,want", [
    # decode: one row block, no cache, the table blocks
    (1, 4096, 4096, 64, 2, (1, 512, 512, 1, 512, 512)),
    # several row blocks: the cached band K x block_n (forward) and
    # N x block_k_dx (dx) are narrowed until they fit NF4_CACHE_BYTES (8 MiB)
    (8192, 4096, 14336, 64, 2, (512, 512, 512, 512, 256, 512)),
    (8192, 14336, 4096, 64, 2, (512, 256, 512, 512, 512, 512)),
    (8192, 14336, 4096, 64, 4, (512, 128, 512, 512, 512, 512)),
    (8192, 11008, 4096, 64, 2, (512, 256, 256, 512, 256, 512)),  # 11008 = 43 * 256
    # K blocks hold whole NF4 blocks: blocksize 1024 needs block_k >= 1024
    (64, 4096, 4096, 1024, 2, (64, 512, 1024, 64, 1024, 512)),
    (64, 4000, 4096, 64, 2, None),  # K not a multiple of 256
    (64, 4096, 4000, 64, 2, None),  # N not a multiple of 128
])
def test_fit_nf4(m, k, n, blocksize, itemsize, want):
    fitted = BlockSizes().fit_nf4(m, k, n, blocksize=blocksize, itemsize=itemsize)
    if want is None:
        assert fitted is None
        return
    assert dataclasses.astuple(fitted) == want
    assert k % fitted.block_k == 0 and fitted.block_k % max(256, blocksize) == 0
    assert n % fitted.block_n == 0 and n % fitted.block_n_dx == 0
