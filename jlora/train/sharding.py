"""A named device mesh over (data, fsdp, tensor) and the PartitionSpec of every array in training.

The model arrays' rules (`param_spec`, `nf4_specs`) live in jlora.convert.mesh_rules, where the
sharded loader creates arrays in them; they are re-exported here. Optimizer state mirrors the params;
batches shard their rows over (data, fsdp).
"""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jlora.convert.mesh_rules import ROW_PARALLEL  # noqa: F401  (re-exported)
from jlora.convert.mesh_rules import nf4_specs  # noqa: F401  (re-exported)
from jlora.convert.mesh_rules import param_spec
from jlora.mesh_axes import AXES
from jlora.mesh_axes import ROW_AXES


def parse_mesh(spec: str | None, n_devices: int | None = None) -> dict[str, int]:
    """'data=2,fsdp=2,tensor=2' -> sizes; unnamed axes are 1, and data=-1 (or none given) takes the rest."""
    n = n_devices or jax.device_count()
    sizes = {a: 1 for a in AXES}
    given = {}
    for part in filter(None, (spec or "").split(",")):
        name, _, value = part.partition("=")
        if name.strip() not in AXES or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"mesh {spec!r}: expected comma-separated axis=size with axes {AXES}, found {part!r}")
        given[name.strip()] = int(value)
    sizes.update(given)
    if "data" not in given or sizes["data"] == -1:
        rest = math.prod(v for k, v in sizes.items() if k != "data")
        sizes["data"] = n // rest if rest and n % rest == 0 else -1
    if math.prod(sizes.values()) != n or min(sizes.values()) < 1:
        raise ValueError(f"mesh {spec!r} gives {sizes}, whose product must equal the {n} devices")
    return sizes


def make_mesh(spec: str | None = None, devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    sizes = parse_mesh(spec, len(devices))
    return Mesh(np.array(devices).reshape([sizes[a] for a in AXES]), AXES)


def shard_flat(flat: dict, mesh: Mesh) -> dict:
    return {k: jax.device_put(v, NamedSharding(mesh, param_spec(k, v.shape, mesh))) for k, v in flat.items()}


def flat_shardings(flat: dict, mesh: Mesh) -> dict:
    return {k: NamedSharding(mesh, param_spec(k, v.shape, mesh)) for k, v in flat.items()}


def batch_sharding(mesh: Mesh, ndim: int, row_axis: int) -> NamedSharding:
    spec = [None] * ndim
    spec[row_axis] = ROW_AXES
    return NamedSharding(mesh, P(*spec))
