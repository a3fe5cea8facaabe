"""When a plan does not fit: a mesh / micro-batch / remat setting that does, or how many chips it takes.

Every (data, fsdp, tensor) mesh of the slice, micro-batch b = B, B/2, B/4, ... (with grad-accum
B/b, so the optimizer step sees the same rows) and remat none/full is estimated (jlora.plan.estimate,
no compiler); those under MARGIN of HBM are ordered by what costs least speed:

    no remat before remat (remat recomputes the forward: ~1.3x FLOPs), then the larger micro-batch,
    then less tensor parallelism, then less data parallelism (fsdp shards the weights as well)

and compiled in that order until one fits (at most `max_compiles`), so a TPU suggestion is checked
by the compiler. If nothing on this slice can hold the frozen weights and optimizer state, the
smallest standard slice of the generation that can is suggested instead (estimated, not compiled).
"""
from __future__ import annotations

import dataclasses

from jlora.plan.hardware import parse_topology
from jlora.train.sharding import AXES

MARGIN = 0.9
SLICES = {
    "v5e": ["2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"],
    "v6e": ["2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"],
    "v4": ["2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8"],
    "v5p": ["2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8"],
    "h100": ["1", "2", "4", "8", "16", "32", "64"],
    "h200": ["1", "2", "4", "8", "16", "32", "64"],
}


@dataclasses.dataclass
class Suggestion:
    topology: str
    remat: str
    mesh: dict
    batch_size: int
    grad_accum: int
    bytes_per_chip: int
    verified: bool           # compiled for the topology and fits
    reason: str

    def flags(self) -> str:
        mesh = ",".join(f"{a}={self.mesh[a]}" for a in AXES if self.mesh[a] > 1) or "data=1"
        accum = f" --grad-accum {self.grad_accum}" if self.grad_accum > 1 else ""
        remat = f" --remat {self.remat}" if self.remat != "none" else ""
        return f"--mesh {mesh} --batch-size {self.batch_size}{accum}{remat}"


def meshes(devices: int):
    for data in range(1, devices + 1):
        if devices % data:
            continue
        for fsdp in range(1, devices // data + 1):
            if (devices // data) % fsdp == 0:
                yield {"data": data, "fsdp": fsdp, "tensor": devices // data // fsdp}


def candidates(planner, devices: int, batch_size: int, grad_accum: int):
    """(estimate, setting) for every setting of `devices` devices, fitting ones in the order above.

    On a slice of several hosts (more than 4 chips) tensor stays within a host: jlora train feeds every
    host its own rows, which a tensor group across hosts would have to share.
    """
    rows_total = batch_size * grad_accum
    hbm = planner.topology.chip.hbm_bytes
    per_host = 4 * planner.devices_per_chip
    found = []
    for sizes in meshes(devices):
        shards = sizes["data"] * sizes["fsdp"]
        if devices > per_host and sizes["tensor"] > per_host:
            continue
        if not planner.loadable(sizes):  # the loader would refuse it (an axis that does not divide a tensor)
            continue
        b = batch_size
        while b >= shards:
            if b % shards == 0 and rows_total % b == 0:
                for remat in ("none", "full"):
                    est = planner.estimate(sizes, b, remat)
                    if est <= MARGIN * hbm:
                        key = (remat != "none", -b, sizes["tensor"], sizes["data"])
                        found.append((key, est, dict(remat=remat, sizes=sizes, batch_size=b,
                                                     grad_accum=rows_total // b)))
            if b % 2:
                break
            b //= 2
    found.sort(key=lambda f: f[0])
    return [(est, setting) for _, est, setting in found]


def suggest(planner, attempts) -> Suggestion | None:
    """A setting that fits (compiled when on TPU), or a larger slice; None if even the largest is too small."""
    r = planner.request
    tried = {(a.remat, tuple(a.mesh.values()), a.batch_size) for a in attempts}
    budget = r.max_compiles
    for est, s in candidates(planner, planner.n_devices, r.batch_size, r.grad_accum):
        if (s["remat"], tuple(s["sizes"].values()), s["batch_size"]) in tried:
            continue
        if not planner.topology.is_tpu:
            return Suggestion(planner.topology.name, s["remat"], s["sizes"], s["batch_size"], s["grad_accum"],
                              est, False, "estimate (no compiler for GPUs)")
        if budget <= 0:
            return Suggestion(planner.topology.name, s["remat"], s["sizes"], s["batch_size"], s["grad_accum"],
                              est, False, f"estimate; not compiled (--max-compiles {r.max_compiles} spent)")
        budget -= 1
        attempt = planner.attempt(s["sizes"], s["batch_size"], s["remat"], s["grad_accum"])
        if attempt.fits:
            return Suggestion(planner.topology.name, s["remat"], s["sizes"], s["batch_size"], s["grad_accum"],
                              attempt.bytes_per_chip, True, "compiled for this topology: fits")
    return _more_chips(planner)


def _more_chips(planner) -> Suggestion | None:
    """The smallest standard slice of this generation on which some setting is estimated to fit."""
    r, topo = planner.request, planner.topology
    for grid in SLICES.get(topo.generation, []):
        other = parse_topology(f"{topo.generation}:{grid}")
        if other.chips <= topo.chips:
            continue
        found = candidates(planner, other.chips * planner.devices_per_chip, r.batch_size, r.grad_accum)
        if found:
            est, s = found[0]
            return Suggestion(other.name, s["remat"], s["sizes"], s["batch_size"], s["grad_accum"], est, False,
                              f"no setting fits {topo.chips} chips; estimated for {other.chips} "
                              f"(run jlora plan --topology {other.name} to compile it)")
    return None
