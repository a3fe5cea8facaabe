"""Tile sizes for the fused LoRA matmul kernels.

The forward pass tiles ``y = x @ w + xa @ b`` ([M, K] @ [K, N]) over the grid
``(M / block_m, N / block_n, K / block_k)``; the input-gradient pass tiles
``dx = dy @ w.T + g @ a.T`` ([M, N] @ [N, K]) over
``(M / block_m_dx, K / block_k_dx, N / block_n_dx)``. The last grid axis is the
contraction in both, so ``block_k`` must divide K and ``block_n_dx`` must divide
N; M may be ragged (the last row block is padded on read and masked on write).
"""

from __future__ import annotations

import dataclasses
import math

import jax

# Mosaic tiles VMEM in (8, 128) vregs: the lane (last) dimension of a block must
# be a multiple of 128 and the sublane dimension a multiple of 8, unless the block
# spans the whole array dimension.
LANE = 128
SUBLANE = 8


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Block sizes for the forward and the dx kernels (see module docstring)."""

    block_m: int = 512
    block_n: int = 512
    block_k: int = 512
    block_m_dx: int = 512
    block_k_dx: int = 512
    block_n_dx: int = 512

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"BlockSizes.{field.name}={value!r} must be a positive int")

    @classmethod
    def get_default(cls, device_kind: str | None = None) -> BlockSizes:
        """The table entry for ``device_kind`` (default: the first local device's)."""
        if device_kind is None:
            device_kind = jax.devices()[0].device_kind
        return _DEFAULTS.get(device_kind, cls())

    def fit(self, m: int, k: int, n: int) -> BlockSizes | None:
        """Shrinks each block to a size that tiles [M, K] @ [K, N], or None.

        Contraction blocks (block_k, block_n_dx) must divide their dimension; they
        are halved down to 128 until they do, or taken whole when the dimension is
        no larger than the block. Output blocks on N and K follow the same rule so
        that the two passes agree; M blocks are clipped to M (ragged M is allowed).
        Returns None when some dimension cannot be tiled (the caller falls back to
        XLA).
        """
        sizes = dict(
            block_m=_clip_rows(self.block_m, m),
            block_n=_divisor_block(self.block_n, n),
            block_k=_divisor_block(self.block_k, k),
            block_m_dx=_clip_rows(self.block_m_dx, m),
            block_k_dx=_divisor_block(self.block_k_dx, k),
            block_n_dx=_divisor_block(self.block_n_dx, n),
        )
        if any(v is None for v in sizes.values()):
            return None
        return BlockSizes(**sizes)

    def fit_nf4(self, m: int, k: int, n: int, *, blocksize: int,
                itemsize: int) -> BlockSizes | None:
        """Like ``fit`` for the NF4 kernels (nf4_matmul.py), or None.

        K blocks (block_k, block_k_dx) are multiples of ``lcm(256, blocksize)``
        that divide K (a kernel tile is whole NF4 blocks and whole 128-lane
        nibble-plane chunks), at most 128 NF4 blocks; N blocks follow ``fit``.
        When M spans more than one row block the kernels keep a band of
        dequantized tiles in VMEM (K x block_n forward, N x block_k_dx for dx);
        those blocks are halved (down to the unit) until the band fits
        ``NF4_CACHE_BYTES``, so each weight is dequantized once per pass.
        """
        unit = math.lcm(2 * LANE, blocksize)
        if k % unit or n % LANE and n > self.block_n:
            return None
        sizes = dict(
            block_m=_clip_rows(self.block_m, m),
            block_n=_divisor_block(self.block_n, n),
            block_k=_nf4_k_block(self.block_k, k, unit, blocksize),
            block_m_dx=_clip_rows(self.block_m_dx, m),
            block_k_dx=_nf4_k_block(self.block_k_dx, k, unit, blocksize),
            block_n_dx=_divisor_block(self.block_n_dx, n),
        )
        if any(v is None for v in sizes.values()):
            return None
        if m > sizes["block_m"]:
            sizes["block_n"] = _shrink_for_cache(sizes["block_n"], k * itemsize,
                                                 n, LANE)
        if m > sizes["block_m_dx"]:
            sizes["block_k_dx"] = _shrink_for_cache(sizes["block_k_dx"],
                                                    n * itemsize, k, unit)
        return BlockSizes(**sizes)


def _clip_rows(block: int, dim: int) -> int:
    return dim if dim <= block else block


def _divisor_block(block: int, dim: int) -> int | None:
    if dim <= block:
        return dim
    b = block
    while b >= LANE:
        if dim % b == 0 and b % LANE == 0:
            return b
        b //= 2
    return None


def _nf4_k_block(block: int, k: int, unit: int, blocksize: int) -> int | None:
    """Largest multiple of unit dividing k, at most max(block, unit) and 128 NF4 blocks."""
    limit = min(max(block, unit), 128 * blocksize)
    best = None
    for b in range(unit, min(limit, k) + 1, unit):
        if k % b == 0:
            best = b
    return best


def _shrink_for_cache(block: int, band_bytes_per_unit: int, dim: int,
                      unit: int) -> int:
    """Halves block (keeping it a divisor of dim) until the cached band fits."""
    while (block * band_bytes_per_unit > NF4_CACHE_BYTES and block // 2 >= unit
           and (block // 2) % unit == 0 and dim % (block // 2) == 0):
        block //= 2
    return block


# VMEM for the NF4 kernels' band of dequantized tiles (see fit_nf4), leaving
# room for the pipelined blocks under the 16 MiB scoped-VMEM default of v4/v5.
NF4_CACHE_BYTES = 8 * 1024 * 1024

# Per-generation starting points, keyed by ``device.device_kind``. Sized so that
# the double-buffered bf16 tiles plus the fp32 accumulator stay well inside the
# default scoped VMEM (16 MiB on v4/v5e/v5p, 32 MiB on v6e); they compile for
# each generation (tests/kernels/test_tpu_compile.py) but are not timed on
# hardware yet.
_DEFAULTS: dict[str, BlockSizes] = {
    "TPU v4": BlockSizes(),
    "TPU v5 lite": BlockSizes(),
    "TPU v5": BlockSizes(),
    "TPU v6 lite": BlockSizes(block_m=512, block_n=1024, block_k=512,
                              block_m_dx=512, block_k_dx=1024, block_n_dx=512),
}

# Tiles of the Triton GPU kernels (triton_lora.py, triton_nf4.py) when
# impl="triton" gets no block_sizes: (M, N, K) of the forward and (M, K, N) of
# dx, in BlockSizes' field order. Powers of two (tl.arange); every shape is
# masked, so nothing needs to divide. A common Hopper/Ampere bf16 tile.
TRITON_BLOCK_SIZES = BlockSizes(block_m=128, block_n=128, block_k=64,
                                block_m_dx=128, block_k_dx=128, block_n_dx=64)
