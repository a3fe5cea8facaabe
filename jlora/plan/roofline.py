"""Roofline step time from per-chip FLOPs and HBM bytes, and the MFU it implies.

    step_time = max(flops / peak_flops, hbm_bytes / hbm_bandwidth)          (per chip)
    MFU       = model FLOPs of the step / (chips * peak_flops * step_time)

A lower bound on the step time: it leaves out inter-chip communication (FSDP all-gathers and
gradient reductions), kernel launch and pipeline bubbles, so real steps are slower and real MFU lower.
"""
from __future__ import annotations

import dataclasses

from jlora.plan.hardware import Chip


@dataclasses.dataclass(frozen=True)
class Roofline:
    compute_seconds: float
    memory_seconds: float
    model_flops: float     # whole step, all chips
    chips: int
    peak_flops: float

    @property
    def step_seconds(self) -> float:
        return max(self.compute_seconds, self.memory_seconds)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_seconds >= self.memory_seconds else "HBM bandwidth"

    @property
    def mfu(self) -> float:
        return self.model_flops / (self.chips * self.peak_flops * self.step_seconds) if self.step_seconds else 0.0


def roofline(*, flops_per_chip: float, bytes_per_chip: float, chip: Chip, chips: int, model_flops: float) -> Roofline:
    return Roofline(compute_seconds=flops_per_chip / chip.peak_flops,
                    memory_seconds=bytes_per_chip / chip.hbm_bandwidth,
                    model_flops=model_flops, chips=chips, peak_flops=chip.peak_flops)
