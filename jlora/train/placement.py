"""Putting the frozen state, optimizer state and host batches onto the mesh."""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jlora.nf4 import NF4Tensor
from jlora.train.sharding import batch_sharding, nf4_specs, param_spec
from jlora.train.state import path_name


def shard_state(state: nnx.State, mesh: Mesh) -> nnx.State:
    """Each frozen array placed by its name's rule (kernels over fsdp/tensor, norms replicated, NF4 codes
    split along their flat axis)."""
    items = []
    for p, v in nnx.to_flat_state(state):
        value = v.get_value()
        if isinstance(value, NF4Tensor):
            specs = nf4_specs(value, mesh)
            value = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), value, specs)
        elif hasattr(value, "shape"):
            value = jax.device_put(value, NamedSharding(mesh, param_spec(path_name(p), value.shape, mesh)))
        items.append((p, v.replace(value)))
    return nnx.from_flat_state(items)


def opt_state_shardings(opt_state, mesh: Mesh):
    """Optimizer moments follow their parameter (found by the dict key in the path); scalars replicate."""
    def spec(path, leaf):
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        if names and getattr(leaf, "ndim", 0) > 0:
            return NamedSharding(mesh, param_spec(str(names[-1]), leaf.shape, mesh))
        return NamedSharding(mesh, P())
    return jax.tree_util.tree_map_with_path(spec, opt_state)


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh, row_axis: int) -> dict[str, jax.Array]:
    """Host-local rows -> global arrays sharded over (data, fsdp) along `row_axis`."""
    out = {}
    for k, v in batch.items():
        sharding = batch_sharding(mesh, v.ndim, row_axis)
        out[k] = jax.make_array_from_process_local_data(sharding, v)
    return out
