"""Where every model array lives on the (data, fsdp, tensor) mesh: the PartitionSpec of each by its name.

    param_spec("model.layers.0.self_attn.q_proj.kernel", (4096, 4096), mesh)  ->  P("fsdp", "tensor")

Base kernels [in, out]: column-parallel projections (q, k, v, gate, up, lm_head) shard in over fsdp and
out over tensor; row-parallel ones (o, down; jlora.mesh_axes) shard in over tensor and out over fsdp.
Adapters follow their base weight: A [in, r] takes W's input axis, B [r, out] its output axis, r
replicated. The embedding [vocab, hidden] shards vocab over tensor and hidden over fsdp. Norms, biases
and scalars replicate. An NF4 kernel's packed codes and block scales are 1-D runs over the flattened
torch [out, in] weight: they shard contiguously over (fsdp, tensor) when every device gets whole
blocks, which cuts the weight into row blocks; else (and the small nested statistics) replicate.

The loader creates arrays in these shardings (jlora.convert.sharded_load) and the trainer keeps them
(jlora.train.placement), so the two cannot disagree. `param_spec` drops an axis that does not divide a
dimension (a small adapter); `checked_spec` is the loader's strict form: a base tensor whose dimension
a mesh axis does not divide is an error, never a silent replication of a large tensor.
"""
from __future__ import annotations

import dataclasses
import re

from jax.sharding import Mesh, PartitionSpec as P

from jlora.mesh_axes import ROW_PARALLEL_MODULES

ROW_PARALLEL = re.compile(r"\.(" + "|".join(ROW_PARALLEL_MODULES) + r")\.")
NF4_AXES = ("fsdp", "tensor")


def wanted_spec(name: str) -> tuple:
    """The axes a model array of this flat name shards over, one entry per dimension (before fitting)."""
    if ".layers.group." in name:  # a scanned stack (jlora.models.stacked): leading layer axis replicated
        return (None,) + wanted_spec(name.replace(".layers.group.", ".layers.", 1))
    row = ROW_PARALLEL.search("." + name) is not None
    in_axis, out_axis = ("tensor", "fsdp") if row else ("fsdp", "tensor")
    if name.endswith(".lora.a"):
        return (in_axis, None)
    if name.endswith(".lora.b"):
        return (None, out_axis)
    if name.endswith(".kernel"):
        return (in_axis, out_axis)
    if name.endswith("embed_tokens.weight"):
        return ("tensor", "fsdp")
    return ()  # norms, biases, scalars: replicated


def _fit(spec: tuple, shape: tuple, mesh: Mesh) -> P:
    """Drops an axis where it does not divide the dimension (small vocab, few kv heads)."""
    out = []
    for axis, dim in zip(spec, shape):
        size = mesh.shape[axis] if axis else 1
        out.append(axis if axis and dim % size == 0 else None)
    return P(*out)


def param_spec(name: str, shape: tuple, mesh: Mesh) -> P:
    """PartitionSpec of a model array by its flat name (`model.layers.0.mlp.down_proj.lora.b`)."""
    return _fit(wanted_spec(name), shape, mesh)


class MeshError(ValueError):
    """A mesh that cannot hold a tensor as the sharding rules place it."""


def checked_spec(name: str, shape: tuple, mesh: Mesh, *, tensor: str | None = None) -> P:
    """param_spec, but an axis of size > 1 that does not divide its dimension is a MeshError naming the
    tensor (`tensor`, e.g. the HF name; else `name`), its shape, the axis and the mesh."""
    for axis, dim in zip(wanted_spec(name), shape):
        if axis and dim % mesh.shape[axis]:
            raise MeshError(f"{tensor or name}: shape {tuple(shape)} cannot be split over mesh axis "
                            f"{axis!r} of size {mesh.shape[axis]} (dimension {dim} is not a multiple of it) "
                            f"on mesh {dict(mesh.shape)}; pick a mesh whose {axis} size divides {dim}")
    return param_spec(name, shape, mesh)


def nf4_shards(mesh: Mesh) -> int:
    """How many contiguous pieces an NF4 weight's flat arrays split into: fsdp x tensor."""
    return mesh.shape["fsdp"] * mesh.shape["tensor"]


def nf4_splits(q, mesh: Mesh) -> bool:
    """Whether an NF4Tensor's codes and absmax split into whole blocks per device: no partial last
    block, and the block count a multiple of fsdp x tensor."""
    shards = nf4_shards(mesh)
    blocks, partial = divmod(q.size, q.blocksize)
    return shards > 1 and not partial and blocks % shards == 0


def nf4_specs(q, mesh: Mesh):
    """The PartitionSpecs of an NF4Tensor's arrays (an NF4Tensor of specs): codes and absmax split along
    their one axis over (fsdp, tensor) where each device gets whole blocks, the rest replicated."""
    flat = P(NF4_AXES) if nf4_splits(q, mesh) else P()
    if q.codes.ndim == 2:  # stacked layers (jlora.models.stacked): the leading layer axis stays whole
        flat = P(None, *flat)
    return dataclasses.replace(q, codes=flat, absmax=flat, nested_absmax=P(), offset=P(), nested_code=P())
