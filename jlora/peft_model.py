"""Attach LoRA adapters to a Llama model's projections and count parameters as PEFT does."""
from __future__ import annotations

import dataclasses
from typing import Iterator

import jax
import numpy as np
from flax import nnx

from jlora.llama import Linear, LlamaForCausalLM
from jlora.lora_config import LoraConfig
from jlora.lora_layer import LoRA, LoRAParam
from jlora.memory import memory_report
from jlora.models.fused import fused_targets
from jlora.models.stacked import on_loop_model
from jlora.module_patterns import list_entry_matches
from jlora.nf4_weight import NF4Weight
from jlora.trainable_tokens import ModulesToSave, add_trainable_embeddings


def linear_modules(model: LlamaForCausalLM) -> Iterator[tuple[str, Linear]]:
    """(HF module name, module) for each adaptable projection, e.g. `model.layers.3.mlp.up_proj`."""
    projections = model.config.projections()
    for i, layer in enumerate(model.model.layers):
        for sub, name, _ in projections:
            yield f"model.layers.{i}.{sub}.{name}", getattr(getattr(layer, sub), name)


def adapted_modules(model: LlamaForCausalLM) -> Iterator[tuple[str, Linear]]:
    """(HF module name, module) for each projection that carries a LoRA adapter."""
    return ((n, m) for n, m in linear_modules(model) if m.lora is not None)


def _successive_keys(rngs: nnx.Rngs, n: int) -> list[jax.Array]:
    """The keys of n successive `rngs.params()` draws, with one update of the stream's counter.

    A draw is fold_in(key, count) then count += 1; under nnx.eval_shape each counter update asks the
    tracer for its sharding, which walks the whole trace so far, so n draws cost O(n^2) there.
    """
    stream = rngs.params
    key, count = stream.key[...], stream.count[...]
    keys = [jax.random.fold_in(key, count + i) for i in range(n)]
    stream.count[...] = count + n
    return keys


@on_loop_model  # a scanned model: unstacked for the writes, stacked again (jlora.models.stacked)
def get_peft_model(model: LlamaForCausalLM, config: LoraConfig, *, rngs: nnx.Rngs) -> LlamaForCausalLM:
    """Adds a LoRA adapter to every projection `config` targets (in place) and returns the model.

    The model is left in eval mode (dropout off); call `model.train()` to enable dropout.
    """
    if model.config.fused_projections:  # Llama's split names mean the fused modules they make up
        config = dataclasses.replace(config, target_modules=fused_targets(config.target_modules))
    names = [n for n, _ in linear_modules(model)]
    targets = [(n, m) for n, m in linear_modules(model) if config.matches(n)]
    if not targets:
        suffixes = sorted({n.rsplit(".", 1)[1] for n in names})
        raise ValueError(
            f"target_modules={config.target_modules!r} matches no module of this model; "
            f"it has {suffixes} (e.g. {names[0]!r}; lm_head and embed_tokens cannot be adapted)"
        )
    if not isinstance(config.target_modules, str):
        have = {n.rsplit(".", 1)[1] for n in names}
        unknown = [t for t in config.target_modules if not any(list_entry_matches(t, n) for n in names)]
        if unknown:
            raise ValueError(f"target_modules {unknown} are not modules of this model; it has {sorted(have)}")
    for name, module in targets:
        if module.lora is not None:
            raise ValueError(f"{name} already has a LoRA adapter")
    for (name, module), key in zip(targets, _successive_keys(rngs, len(targets))):
        module.lora = LoRA(module.in_features, module.out_features, config.rank_for(name),
                           scaling=config.scaling_for(name), dropout=config.lora_dropout,
                           init_weights=config.init_lora_weights, rngs=rngs, key=key)
        if config.use_dora:  # m = ||W + s B A|| per output feature (jlora/dora.py)
            module.lora.init_magnitude(module.kernel.get_value())
    add_trainable_embeddings(model, config)  # modules_to_save, trainable_token_indices (jlora/trainable_tokens.py)
    model.lora_config = config
    model.eval()
    return model


def trainable_parameters(model: nnx.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts as PEFT's `get_nb_trainable_parameters` gives them.

    trainable = LoRA A and B (and DoRA magnitudes, trained embedding/head copies and token rows); total =
    every Param plus the NF4 weights, each counted as PEFT counts a bitsandbytes `Params4bit`: twice its packed
    uint8 bytes (2 * ceil(out * in / 2)). A `modules_to_save` copy counts twice in the total, as in PEFT, which
    keeps the original module beside its trained copy.
    """
    trainable = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, LoRAParam)))
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    total += sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, ModulesToSave)))
    quantized = nnx.state(model, NF4Weight)
    total += sum(2 * int(np.prod(v.get_value().codes.shape)) for _, v in nnx.to_flat_state(quantized))
    return trainable, total


def print_trainable_parameters(model: nnx.Module) -> None:
    """Prints PEFT's line `trainable params: N || all params: M || trainable%: P`, then bytes by kind."""
    trainable, total = trainable_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
    print(memory_report(model))
