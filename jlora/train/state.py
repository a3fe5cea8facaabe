"""A model split for training: adapter params as a flat {name: array} dict, everything else frozen.

    graphdef, lora, rng, frozen = nnx.split(model, LoRAParam, nnx.RngState, ...)

The flat dict (keys like `model.layers.0.self_attn.q_proj.lora.a`) is what the optimizer, the
checkpoints and the sharding rules see; `TrainState.model(params)` rebuilds the NNX model inside jit.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

from jlora.lora_layer import LoRAParam


def path_name(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def flatten(state: nnx.State) -> dict[str, jax.Array]:
    return {path_name(p): v.get_value() for p, v in nnx.to_flat_state(state)}


def unflatten(template: nnx.State, flat: dict[str, Any]) -> nnx.State:
    return nnx.from_flat_state([(p, v.replace(flat[path_name(p)])) for p, v in nnx.to_flat_state(template)])


@dataclasses.dataclass
class SplitModel:
    """The static graph, the adapter template, the dropout RNG template and the frozen state."""
    graphdef: Any
    lora_template: nnx.State
    rng_state: nnx.State
    frozen: nnx.State

    @classmethod
    def of(cls, model: nnx.Module) -> "SplitModel":
        graphdef, lora, rng, frozen = nnx.split(model, LoRAParam, nnx.RngState, ...)
        return cls(graphdef, lora, rng, frozen)

    def params(self) -> dict[str, jax.Array]:
        return flatten(self.lora_template)

    def model(self, params: dict[str, jax.Array], frozen: nnx.State, key: jax.Array | None = None) -> nnx.Module:
        """The NNX model with `params` as its adapters; dropout streams reseeded from `key` (distinct per stream)."""
        # Fresh Variables built inside the trace: dropout updates its RngCount, which NNX only allows
        # on Variables of the current trace level.
        items = []
        for i, (p, v) in enumerate(nnx.to_flat_state(self.rng_state)):
            if key is not None and isinstance(v, nnx.RngKey):
                items.append((p, v.replace(jax.random.fold_in(key, i))))
            else:
                items.append((p, v.replace(v.get_value())))
        rng = nnx.from_flat_state(items)
        return nnx.merge(self.graphdef, unflatten(self.lora_template, params), rng, frozen)
