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
