"""The real train step and its arguments as ShapeDtypeStructs placed on a mesh: no array is ever allocated.

    step = abstract_step(model, mesh, batch_size=8, seq_len=2048)
    jax.jit(step.fn, donate_argnums=(0, 1), out_shardings=step.out_shardings).lower(*step.args)

Placement is the trainer's: adapters and frozen arrays by `param_spec` of their flat name (NF4 kernels
by `nf4_specs`), optimizer moments like their parameter, batch rows over (data, fsdp); the optimizer
is `make_optimizer` with a
warmup-cosine schedule, the step `make_train_step`, with params and optimizer state donated.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jlora.nf4 import NF4Tensor
from jlora.train.optimizer import learning_rate_schedule, make_optimizer
from jlora.train.placement import opt_state_shardings
from jlora.train.sharding import batch_sharding, nf4_specs, param_spec
from jlora.train.state import SplitModel, path_name
from jlora.train.chunked_loss import DEFAULT_CHUNK_TOKENS
from jlora.train.step import make_train_step

BATCH_KEYS = ("inputs", "targets", "loss_mask", "positions", "segment_ids")


class _TraceSafeSplit(SplitModel):
    """SplitModel whose frozen Variables are rebuilt inside the trace, as its adapters already are.

    nnx.remat writes the layer's Variables back after the call, which NNX refuses for Variables from
    an outer trace level (flax.errors.TraceContextError): with `model.remat = True`, SplitModel.model
    fails inside value_and_grad. Same arrays, same HLO; only the Python Variable objects are new.
    """

    def model(self, params, frozen, key=None):
        frozen = nnx.from_flat_state([(p, v.replace(v.get_value())) for p, v in nnx.to_flat_state(frozen)])
        return super().model(params, frozen, key)


def trace_safe_split(model: nnx.Module) -> SplitModel:
    s = SplitModel.of(model)
    return _TraceSafeSplit(s.graphdef, s.lora_template, s.rng_state, s.frozen)


@dataclasses.dataclass
class AbstractStep:
    fn: Any                  # step(params, opt_state, frozen, batch, key, step_index)
    args: tuple              # ShapeDtypeStructs with NamedShardings, in that order
    out_shardings: tuple
    names: tuple = ("params", "opt_state", "frozen", "batch", "key", "step")

    def bytes_per_device(self) -> dict[str, int]:
        """Bytes each device holds of every argument group (largest shard, so exact for even splits)."""
        return {name: sum(shard_bytes(x) for x in jax.tree.leaves(arg)) for name, arg in zip(self.names, self.args)}


def shard_bytes(x) -> int:
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return 8 * math.prod(shape)  # a threefry key is two uint32
    return math.prod(shape) * np.dtype(x.dtype).itemsize


def _place(x, sharding):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def frozen_specs(name: str, value, mesh):
    """PartitionSpecs of one frozen Variable's value, as jlora.train.placement.shard_state places it."""
    if isinstance(value, NF4Tensor):
        return nf4_specs(value, mesh)
    return param_spec(name, value.shape, mesh)


def _frozen_state(frozen: nnx.State, mesh) -> nnx.State:
    """The frozen state with every array a ShapeDtypeStruct carrying its NamedSharding."""
    items = []
    for p, v in nnx.to_flat_state(frozen):
        value = v.get_value()
        specs = frozen_specs(path_name(p), value, mesh)
        placed = jax.tree.map(lambda s, x: _place(x, NamedSharding(mesh, s)), specs, value, is_leaf=_is_spec)
        items.append((p, v.replace(placed)))
    return nnx.from_flat_state(items)


def abstract_step(model: nnx.Module, mesh, *, batch_size: int, seq_len: int, grad_accum: int = 1,
                  steps: int = 1000, warmup_steps: int = 5,
                  loss_chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS) -> AbstractStep:
    """The jitted train step's function and sharded abstract arguments for `model` (abstract) on `mesh`."""
    split = trace_safe_split(model)
    if jax.tree.leaves(split.rng_state):
        raise ValueError("plan builds adapters without dropout; the model has RNG state")
    schedule = learning_rate_schedule(2e-4, steps, warmup_steps)
    tx = make_optimizer(schedule)
    flat = split.params()
    param_sh = {k: NamedSharding(mesh, param_spec(k, v.shape, mesh)) for k, v in flat.items()}
    params = {k: _place(v, param_sh[k]) for k, v in flat.items()}
    opt = jax.eval_shape(tx.init, flat)
    opt_sh = opt_state_shardings(opt, mesh)
    opt = jax.tree.map(_place, opt, opt_sh)
    frozen = _frozen_state(split.frozen, mesh)
    rows = batch_sharding(mesh, 3, 1)
    batch = {k: jax.ShapeDtypeStruct((grad_accum, batch_size, seq_len), jnp.int32, sharding=rows) for k in BATCH_KEYS}
    replicated = NamedSharding(mesh, P())
    key = _place(jax.eval_shape(lambda: jax.random.key(0)), replicated)
    step_index = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    fn = make_train_step(split, tx, schedule=schedule, loss_chunk_tokens=loss_chunk_tokens)
    return AbstractStep(fn=fn, args=(params, opt, frozen, batch, key, step_index),
                        out_shardings=(param_sh, opt_sh, None))


@dataclasses.dataclass
class ArraySizes:
    """The adapters and the frozen state (abstract): per-device bytes for any mesh shape, without devices."""
    params: dict
    frozen: list   # (name, value) of every frozen Variable

    @classmethod
    def of(cls, model: nnx.Module) -> "ArraySizes":
        split = SplitModel.of(model)
        return cls(split.params(), [(path_name(p), v.get_value()) for p, v in nnx.to_flat_state(split.frozen)])

    def per_device(self, sizes: dict[str, int]) -> dict[str, int]:
        """{"params", "opt_state" (AdamW mu and nu), "frozen"} bytes on one device of a (data, fsdp, tensor) mesh."""
        key = tuple(sizes[a] for a in ("data", "fsdp", "tensor"))
        if key not in self._cache:
            mesh = MeshShape(dict(sizes))
            params = sum(spec_bytes(v, param_spec(k, v.shape, mesh), sizes) for k, v in self.params.items())
            frozen = 0
            for name, value in self.frozen:
                specs = frozen_specs(name, value, mesh)
                frozen += sum(spec_bytes(x, s, sizes) for x, s in zip(jax.tree.leaves(value),
                                                                         jax.tree.leaves(specs, is_leaf=_is_spec)))
            self._cache[key] = {"params": params, "opt_state": 2 * params, "frozen": frozen}
        return self._cache[key]

    def total(self) -> dict[str, int]:
        return self.per_device({"data": 1, "fsdp": 1, "tensor": 1})

    def counts(self) -> tuple[int, int]:
        """(trainable, total) parameters; an NF4 weight counts its logical shape, times the layers when it is
        a scanned stack (its codes then have a leading layer axis; `shape` is one layer's)."""
        trainable = sum(math.prod(v.shape) for v in self.params.values())

        def count(v):
            if isinstance(v, NF4Tensor):
                return math.prod(v.shape) * (v.codes.shape[0] if len(v.codes.shape) == 2 else 1)
            return math.prod(v.shape)
        return trainable, trainable + sum(count(v) for _, v in self.frozen)

    def __post_init__(self):
        self._cache = {}


def spec_bytes(x, spec, sizes: dict) -> int:
    """Bytes of one device's shard of array `x` (anything with shape and dtype) placed by PartitionSpec `spec`
    on a mesh of these axis sizes."""
    spec = tuple(spec) + (None,) * len(x.shape)
    shape = [d // math.prod(sizes[a] for a in (ax if isinstance(ax, tuple) else (ax,))) if ax else d
             for d, ax in zip(x.shape, spec)]
    return math.prod(shape) * np.dtype(x.dtype).itemsize


def _is_spec(x) -> bool:
    return isinstance(x, P)


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """What param_spec and nf4_specs read of a Mesh (its axis sizes), for meshes without devices here."""
    shape: dict
