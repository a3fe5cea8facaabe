"""A named device mesh over (data, fsdp, tensor) and the PartitionSpec of every array in training.

Base kernels [in, out]: column-parallel projections (q, k, v, gate, up, lm_head) shard in over fsdp and
out over tensor; row-parallel ones (o, down) shard in over tensor and out over fsdp. Adapters follow
their base weight: A [in, r] takes W's input axis, B [r, out] its output axis, r replicated. Optimizer
state mirrors the params; batches shard their rows over (data, fsdp). An NF4 kernel's packed codes and
block scales are 1-D runs over the flattened [out, in] weight: they shard contiguously over
(fsdp, tensor), which cuts the weight into row blocks; the small nested statistics replicate.
"""
from __future__ import annotations

import dataclasses
import math
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jlora.mesh_axes import AXES
from jlora.mesh_axes import ROW_AXES
from jlora.mesh_axes import ROW_PARALLEL_MODULES

ROW_PARALLEL = re.compile(r"\.(" + "|".join(ROW_PARALLEL_MODULES) + r")\.")


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


def _fit(spec: tuple, shape: tuple, mesh: Mesh) -> P:
    """Drops an axis where it does not divide the dimension (small vocab, few kv heads)."""
    out = []
    for axis, dim in zip(spec, shape):
        size = mesh.shape[axis] if axis else 1
        out.append(axis if axis and dim % size == 0 else None)
    return P(*out)


def param_spec(name: str, shape: tuple, mesh: Mesh) -> P:
    """PartitionSpec of a model array by its flat name (`model.layers.0.mlp.down_proj.lora.b`)."""
    row = ROW_PARALLEL.search("." + name) is not None
    in_axis, out_axis = ("tensor", "fsdp") if row else ("fsdp", "tensor")
    if name.endswith(".lora.a"):
        return _fit((in_axis, None), shape, mesh)
    if name.endswith(".lora.b"):
        return _fit((None, out_axis), shape, mesh)
    if name.endswith(".kernel"):
        return _fit((in_axis, out_axis), shape, mesh)
    if name.endswith("embed_tokens.weight"):
        return _fit(("tensor", "fsdp"), shape, mesh)
    return P()  # norms, biases, scalars: replicated


def nf4_specs(q, mesh: Mesh):
    """The PartitionSpecs of an NF4Tensor's arrays (an NF4Tensor of specs): codes and absmax split along
    their one axis over (fsdp, tensor) where each device gets whole blocks, the rest replicated."""
    shards = mesh.shape["fsdp"] * mesh.shape["tensor"]
    blocks, partial = divmod(q.size, q.blocksize)
    flat = P(("fsdp", "tensor")) if shards > 1 and not partial and blocks % shards == 0 else P()
    return dataclasses.replace(q, codes=flat, absmax=flat, nested_absmax=P(), offset=P(), nested_code=P())


def shard_flat(flat: dict, mesh: Mesh) -> dict:
    return {k: jax.device_put(v, NamedSharding(mesh, param_spec(k, v.shape, mesh))) for k, v in flat.items()}


def flat_shardings(flat: dict, mesh: Mesh) -> dict:
    return {k: NamedSharding(mesh, param_spec(k, v.shape, mesh)) for k, v in flat.items()}


def batch_sharding(mesh: Mesh, ndim: int, row_axis: int) -> NamedSharding:
    spec = [None] * ndim
    spec[row_axis] = ROW_AXES
    return NamedSharding(mesh, P(*spec))
