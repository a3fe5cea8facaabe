"""Does the checkpoint's sharded streaming load fit: what `jlora train`'s `load_hf(dir, mesh=..., quantize=...)`
puts on each device and reads on each host, counted from the shapes alone (no file is read).

    load = plan_load(config, {"data": 1, "fsdp": 8, "tensor": 1}, dtype="bfloat16", quantize="nf4")
    load.device_bytes         # per device once loaded: the bytes of every shard it receives (exact)
    load.device_peak_bytes    # + the most the load holds in flight on one device at a time
    load.host_share_bytes     # what a host's devices hold: devices_per_host x device_bytes
    load.host_inflight_bytes  # the largest piece a host reads at once (one shard, or a tensor read whole)

The rules are the loader's (jlora.convert.sharded_load, placements from jlora.convert.mesh_rules), applied to
the same abstract loop model and HF tensor map (jlora.convert.hf_names.tensor_map):
- a dense tensor is placed by `checked_spec`: a mesh axis of size > 1 that does not divide the dimension it
  shards is the loader's `MeshError` (naming the tensor, its shape, the axis and the mesh), raised here too;
- a decoder projection quantized while loading (or stored in bitsandbytes' 4-bit layout) is an NF4Tensor
  placed by `nf4_specs`: codes and absmax split over fsdp x tensor when every device gets whole blocks,
  else whole on every device; the nested statistics whole.

In flight, beyond what stays (the largest of these over the tensors, one tensor at a time):
- a transposed dense tensor ([out, in] stored, [in, out] kernel): its stored shard until the transpose;
- a projection quantized while loading that splits: its dense run in the load dtype, and with double
  quantization the float32 absmax gathered whole plus its 8-bit codes; one that does not split is
  quantized whole on one device: the dense tensor and its NF4 form whole;
- scanned layers (`scan_layers`, jlora.models.stacked.LayerStackBuilder): a variable's per-layer rows stay
  until its last row is read and the stack is made, so one variable's shards over all layers twice.

A host reads each distinct shard once (replicas along data share the read) and hands it to its devices
before reading the next, so its memory in flight is about one shard (the whole tensor where it is read
whole). On a TPU or GPU host the share lives in device memory; where the devices ARE host memory (CPU,
virtual devices), host peak ~ host_share_bytes + host_inflight_bytes.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from jlora import nf4
from jlora.convert.hf_names import tensor_map, variable_at
from jlora.convert.mesh_rules import checked_spec, nf4_specs, nf4_splits
from jlora.llama import abstract_model
from jlora.models.stacked import structural_period
from jlora.plan.arguments import MeshShape, spec_bytes
from jlora.qlora import nf4_config


@dataclasses.dataclass(frozen=True)
class LoadPlan:
    device_bytes: int          # per device, once loaded (every device holds the same: splits are even)
    device_peak_bytes: int     # device_bytes + the largest in-flight extra
    peak_tensor: str           # the HF tensor (or stacked variable) behind the device peak
    host_share_bytes: int      # devices_per_host x device_bytes
    host_inflight_bytes: int   # the largest piece a host reads at once
    inflight_tensor: str       # the HF tensor behind it
    devices_per_host: int
    replicated: tuple = ()     # HF names of projections held whole on every device (NF4 that does not split)

    def fits(self, hbm_bytes: int) -> bool:
        return self.device_peak_bytes <= hbm_bytes

    @property
    def host_peak_bytes_cpu(self) -> int:
        """Host peak where the devices are host memory (CPU): its share plus the piece in flight."""
        return self.host_share_bytes + self.host_inflight_bytes


@functools.lru_cache(maxsize=8)
def _base(config, dtype: str):
    return abstract_model(config, dtype=dtype)


def plan_load(config, sizes: dict, *, dtype: str = "bfloat16", quantize: str | None = None,
              devices_per_host: int | None = None, scan_layers: bool = False) -> LoadPlan:
    """The load of a `config` checkpoint in `dtype` (NF4 projections with quantize="nf4") onto a
    (data, fsdp, tensor) mesh of these sizes; see the module docstring. Raises the loader's MeshError."""
    mesh = MeshShape(dict(sizes))
    n_devices = math.prod(sizes.values())
    per_host = devices_per_host or n_devices
    model = _base(config, dtype)
    nf4_cfg = nf4_config(quantize) if quantize else None
    item = np.dtype(jax.numpy.dtype(dtype)).itemsize
    total, peak, host = 0, (0, ""), (0, "")
    replicated, stacks = [], {}
    period = structural_period(list(model.model.layers)) if scan_layers else 1
    for name, entry in tensor_map(config).items():
        var = variable_at(model, entry.path)
        hf_shape = entry.hf_shape(var.shape)
        if nf4_cfg is not None and entry.path[0] == "model" and entry.path[-1] == "kernel":
            q = jax.eval_shape(functools.partial(nf4.quantize, blocksize=nf4_cfg.blocksize,
                                                 double_quant=nf4_cfg.double_quant),
                               jax.ShapeDtypeStruct(hf_shape, var.dtype))
            specs = nf4_specs(q, mesh)
            held = sum(spec_bytes(x, s, sizes)
                       for x, s in zip(jax.tree.leaves(q), jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P))))
            n = math.prod(hf_shape)
            if nf4_splits(q, mesh):
                blocks = math.prod(q.absmax.shape)  # gathered whole as float32, and its 8-bit codes
                extra = n // n_devices * item + (5 * blocks if q.double_quant else 0)
                read = n // n_devices * item
            else:
                if n_devices > 1:
                    replicated.append(name)
                extra = n * item + held  # quantized whole on one device, then placed
                read = n * item
        else:
            spec = checked_spec(".".join(map(str, entry.path)), var.shape, mesh, tensor=name)
            held = spec_bytes(var, spec, sizes)
            extra = held if entry.transpose else 0
            read = held
        total += held
        peak = max(peak, (extra, name))
        host = max(host, (read, name))
        if scan_layers and entry.path[:2] == ("model", "layers"):
            key = (entry.path[2] % period, *map(str, entry.path[3:]))
            stacks[key] = stacks.get(key, 0) + held
    if stacks:  # the rows of one variable and its stack, side by side until the rows are released
        key, rows = max(stacks.items(), key=lambda kv: kv[1])
        peak = max(peak, (rows, f"model.layers.{'.'.join(map(str, key))} (its stack)"))
    return LoadPlan(device_bytes=total, device_peak_bytes=total + peak[0], peak_tensor=peak[1],
                    host_share_bytes=per_host * total, host_inflight_bytes=host[0], inflight_tensor=host[1],
                    devices_per_host=per_host, replicated=tuple(replicated))
