"""SmolLM3 (`SmolLM3ForCausalLM`, model_type "smollm3"): the Llama decoder where some layers skip rope.

- `no_rope_layers[i]`: 1 = layer i rotates q and k, 0 = it does not ("NoPE"); the list may be longer
  than the model. Absent: layer i rotates unless (i + 1) % no_rope_layer_interval == 0 (interval
  default 4: layers 3, 7, 11, ... skip rope).
- Windows follow transformers' masks: a layer whose `layer_types` entry is "sliding_attention" attends
  to the last `sliding_window` keys. Without `layer_types`, transformers derives it: the NoPE layers
  slide when `use_sliding_window` and `sliding_window` are both set, every other layer is full.
- `attention_bias` puts biases on q, k, v and o; `mlp_bias` on the MLP; the head is tied by default.

Module names are Llama's (q/k/v/o, gate/up/down), so LoRA targets, PEFT keys and vLLM's rules are too.
SmolLM2 is a plain `LlamaForCausalLM` (its preset lives with the Llama family).
"""
from __future__ import annotations

from typing import Any

from jlora.models.family import ROPE_GLOBAL, ROPE_NONE, ConfigError, Family, LayerSpec
from jlora.models.hf_fields import base_fields, layer_types


def no_rope_layers(d: dict[str, Any], where: str, n: int) -> list[int]:
    """1 (rope) or 0 (no rope) per layer, from `no_rope_layers` or `no_rope_layer_interval`."""
    flags = d.get("no_rope_layers")
    if flags is None:
        interval = d.get("no_rope_layer_interval", 4)
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ConfigError(f"{where}: no_rope_layer_interval must be a positive integer, found {interval!r}")
        return [int((i + 1) % interval != 0) for i in range(n)]
    if not isinstance(flags, list) or len(flags) < n or any(f not in (0, 1) or isinstance(f, float) for f in flags):
        raise ConfigError(f"{where}: no_rope_layers must list 0 or 1 for each of the {n} layers, found {flags!r}")
    return [int(f) for f in flags[:n]]


def read_smollm3(d: dict[str, Any], where: str) -> dict[str, Any]:
    fields = base_fields(d, where, "smollm3")
    n = fields["num_hidden_layers"]
    rope = no_rope_layers(d, where, n)
    window = d.get("sliding_window")
    specs = layer_types(d, where, window)
    if specs is None:  # SmolLM3Config.__post_init__: NoPE layers slide when use_sliding_window and a window
        slide = bool(d.get("use_sliding_window")) and window is not None
        specs = tuple(LayerSpec(window if slide and not r else None) for r in rope)
    specs = tuple(LayerSpec(s.sliding_window, ROPE_GLOBAL if r else ROPE_NONE) for s, r in zip(specs, rope))
    bias = bool(d.get("attention_bias", False))
    fields.update(qkv_bias=bias, o_bias=bias, mlp_bias=bool(d.get("mlp_bias", False)),
                  tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
                  sliding_window=window if any(s.sliding_window for s in specs) else None, layer_specs=specs)
    return fields


PRESETS = {
    # HuggingFaceTB/SmolLM3-3B (no_rope_layers: every 4th layer NoPE, as the interval gives)
    "smollm3-3b": {"architectures": ["SmolLM3ForCausalLM"], "model_type": "smollm3", "hidden_size": 2048,
                   "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
                   "num_key_value_heads": 4, "vocab_size": 128256, "max_position_embeddings": 65536,
                   "rope_theta": 5000000.0, "rope_scaling": None, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
                   "no_rope_layers": [int((i + 1) % 4 != 0) for i in range(36)], "no_rope_layer_interval": 4,
                   "use_sliding_window": False, "sliding_window": None, "attention_bias": False, "mlp_bias": False,
                   "hidden_act": "silu", "bos_token_id": None, "eos_token_id": 128012, "pad_token_id": 128004},
}

FAMILIES = (
    Family("smollm3", ("SmolLM3ForCausalLM",), read_smollm3, PRESETS, peft_default_targets=None),
)
