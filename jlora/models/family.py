"""What a model family is to jlora: a config reader, its presets and its module names (data only).

    Family(model_type="qwen3", architectures=("Qwen3ForCausalLM",), read=read_qwen3, presets={...})

`read(hf_dict, where) -> dict` turns a transformers config.json dict into the fields of
`jlora.models.config.ModelConfig` (every field not returned keeps its Llama default). It raises
ConfigError naming the field and the value for anything the family cannot build yet. Families
import this module and `jlora.models.hf_fields`, never `config` (the config reads the registry).

A `LayerSpec` is the static part of one decoder layer that may differ between layers of the same
model: its attention window and which rotary table it uses. Parameters never differ between layers.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

# The LoRA target names every family so far exposes (transformers' module names; PEFT and vLLM use them).
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

ROPE_GLOBAL, ROPE_LOCAL, ROPE_NONE = "global", "local", "none"


class ConfigError(ValueError):
    """A config.json that jlora cannot build a model from."""


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """Static per-layer settings. sliding_window: the layer attends to the last `sliding_window` keys
    (None: all earlier keys). rope: which rotary table rotates q and k: "global" (rope_theta, rope_scaling),
    "local" (rope_local_theta, unscaled; Gemma 3 sliding layers) or "none" (no rotation; SmolLM3)."""
    sliding_window: int | None = None
    rope: str = ROPE_GLOBAL

    def __post_init__(self):
        if self.rope not in (ROPE_GLOBAL, ROPE_LOCAL, ROPE_NONE):
            raise ValueError(f"LayerSpec.rope must be one of global, local, none; found {self.rope!r}")
        if self.sliding_window is not None and (isinstance(self.sliding_window, bool) or self.sliding_window < 1):
            raise ValueError(f"LayerSpec.sliding_window must be a positive integer or None; found "
                             f"{self.sliding_window!r}")


@dataclasses.dataclass(frozen=True)
class Family:
    """One `model_type`. architectures: the transformers class names whose checkpoints it reads.
    read: HF config dict -> ModelConfig fields. presets: name -> config.json dict of a published model.
    target_modules: the HF module names LoRA may adapt (PEFT's `target_modules`, vLLM's module names).
    peft_default_targets: what PEFT adapts when an adapter_config.json has `target_modules: null` (peft's
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING); None where PEFT has no entry and refuses."""
    model_type: str
    architectures: tuple[str, ...]
    read: Callable[[dict[str, Any], str], dict[str, Any]]
    presets: Mapping[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    target_modules: tuple[str, ...] = ALL_LINEAR
    peft_default_targets: tuple[str, ...] | None = ("q_proj", "v_proj")
