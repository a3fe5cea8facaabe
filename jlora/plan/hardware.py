"""Accelerators `jlora plan` knows: memory and peak rates per chip, and topology names.

| chip      | HBM / chip | bf16 dense peak | HBM bandwidth | source                                             |
|-----------|------------|-----------------|---------------|----------------------------------------------------|
| TPU v4    | 32 GiB     | 275 TFLOP/s     | 1,200 GB/s    | cloud.google.com/tpu/docs/v4 (system architecture) |
| TPU v5e   | 16 GiB     | 197 TFLOP/s     | 819 GB/s      | cloud.google.com/tpu/docs/v5e                      |
| TPU v5p   | 95 GiB     | 459 TFLOP/s     | 2,765 GB/s    | cloud.google.com/tpu/docs/v5p                      |
| TPU v6e   | 32 GiB     | 918 TFLOP/s     | 1,638 GB/s    | cloud.google.com/tpu/docs/v6e                      |
| H100 SXM  | 80 GB      | 989 TFLOP/s     | 3,350 GB/s    | NVIDIA H100 Tensor Core GPU datasheet (SXM5)       |
| H200 SXM  | 141 GB     | 989 TFLOP/s     | 4,800 GB/s    | NVIDIA H200 Tensor Core GPU datasheet (SXM)        |

The same numbers are in shared/REFERENCE.md section 5 (v4 from the lead's brief). GPU peaks are dense
(without 2:4 sparsity). A topology is `<generation>:<chips along each axis>` as libtpu names it
(`v5e:4x4`, `v5p:2x2x4`), or `h100` / `h100:8` (GPUs per node; no compiler, an estimate).
"""
from __future__ import annotations

import dataclasses
import math
import re

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int
    peak_flops: float        # bf16 dense, FLOP/s
    hbm_bandwidth: float     # bytes/s
    kind: str                # "tpu" | "gpu"
    source: str


CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12, 1200e9, "tpu", "cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12, 819e9, "tpu", "cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12, 2765e9, "tpu", "cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("TPU v6e", 32 * GiB, 918e12, 1638e9, "tpu", "cloud.google.com/tpu/docs/v6e"),
    "h100": Chip("NVIDIA H100 SXM", 80 * 10**9, 989e12, 3350e9, "gpu", "NVIDIA H100 datasheet"),
    "h200": Chip("NVIDIA H200 SXM", 141 * 10**9, 989e12, 4800e9, "gpu", "NVIDIA H200 datasheet"),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "trillium": "v6e"}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A parsed topology name: the generation, its chip table entry and the chip grid."""
    name: str
    generation: str
    chip: Chip
    grid: tuple[int, ...]

    @property
    def chips(self) -> int:
        return math.prod(self.grid)

    @property
    def is_tpu(self) -> bool:
        return self.chip.kind == "tpu"


def parse_topology(name: str) -> Topology:
    """'v5e:4x4' -> Topology(generation='v5e', grid=(4, 4)); 'h100:8' -> 8 GPUs; 'h100' -> 1 GPU."""
    text = name.strip().lower()
    gen, _, grid_text = text.partition(":")
    gen = ALIASES.get(gen, gen)
    if gen not in CHIPS:
        raise ValueError(f"topology {name!r}: unknown generation {gen!r}; known: {', '.join(CHIPS)} "
                         f"(e.g. v5e:2x2, v5p:2x2x4, h100:8)")
    chip = CHIPS[gen]
    if not grid_text:
        if chip.kind == "tpu":
            raise ValueError(f"topology {name!r}: a TPU topology needs its chip grid, e.g. {gen}:2x2")
        grid_text = "1"
    if not re.fullmatch(r"\d+(x\d+)*", grid_text):
        raise ValueError(f"topology {name!r}: expected <generation>:<AxB[xC]> (e.g. v5e:4x4) or h100:<gpus>, "
                         f"found {grid_text!r} after the colon")
    grid = tuple(int(v) for v in grid_text.split("x"))
    if min(grid) < 1:
        raise ValueError(f"topology {name!r}: every grid size must be at least 1")
    if chip.kind == "gpu" and len(grid) != 1:
        raise ValueError(f"topology {name!r}: give GPUs as a count, e.g. {gen}:8")
    return Topology(name=f"{gen}:{grid_text}", generation=gen, chip=chip, grid=grid)


def tpu_devices(topology: Topology):
    """The compile-only devices libtpu describes for `topology` (no TPU needed; needs libtpu).

    libtpu wants whole hosts (2x2 chips): a smaller slice (`v5e:1x1`, `v5e:2x1`) is asked for with
    `chips_per_host_bounds` equal to its own grid.
    """
    from jax.experimental import topologies

    name = topology.name
    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=name).devices
    except Exception as e:  # libtpu raises JaxRuntimeError with the reason in the message
        if "chips_per_host_bounds" not in str(e):
            raise
    bounds = list(topology.grid) + [1] * (3 - len(topology.grid))
    return topologies.get_topology_desc(platform="tpu", topology_name=name, chips_per_host_bounds=bounds).devices
