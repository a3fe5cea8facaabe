"""Reading transformers config.json fields into ModelConfig fields: the parts every family shares.

A family reader (jlora/models/llama.py, qwen3.py, ...) starts from `base_fields(d, where)` and adds or
overrides what differs. Every refusal is a ConfigError naming the file, the field and the value.
Reads both config generations: 4.x `rope_theta` + `rope_scaling`, 5.x `rope_parameters`.
"""
from __future__ import annotations

import json
from typing import Any

from jlora.models.family import ROPE_GLOBAL, ConfigError, LayerSpec

ACTIVATIONS = ("silu", "gelu_pytorch_tanh")  # jlora.models.layers.ACTIVATION implements these
ROPE_TYPES = ("default", "linear", "llama3")  # jlora.models.rope implements these

REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def unsupported(where: str, field: str, value, supported) -> ConfigError:
    """The error for a field value jlora cannot build yet (raise it)."""
    return ConfigError(f"{where}: {field}={value!r} is not supported; supported: {', '.join(map(str, supported))}")


def check_numbers(d: dict[str, Any], where: str, sizes=(), numbers=()) -> None:
    """Required sizes present; sizes positive integers; numbers real numbers (when present)."""
    missing = [k for k in REQUIRED if d.get(k) is None]
    if missing:
        raise ConfigError(f"{where}: missing required fields {missing}")
    for k in (*REQUIRED, "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window", *sizes):
        v = d.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"{where}: {k} must be a positive integer, found {v!r}")
    for k in ("rms_norm_eps", "rope_theta", "initializer_range", *numbers):
        v = d.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ConfigError(f"{where}: {k} must be a number, found {v!r}")


def rope_settings(params: dict[str, Any] | None, where: str, *, field: str = "rope_scaling",
                  types=ROPE_TYPES) -> tuple[float | None, tuple | None]:
    """(theta or None, scaling as sorted items or None) from a rope dict: a 4.x `rope_scaling` or a 5.x
    `rope_parameters` entry (which also holds `rope_theta`)."""
    params = dict(params or {})
    theta = params.pop("rope_theta", None)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in types:
        raise unsupported(where, f"{field}.rope_type", kind, types)
    if kind == "default":
        return theta, None
    params["rope_type"] = kind
    params.pop("type", None)
    return theta, tuple(sorted(params.items()))


def global_rope(d: dict[str, Any], where: str, types=ROPE_TYPES) -> dict[str, Any]:
    """rope_theta and rope_scaling fields from `rope_theta`/`rope_scaling` or a flat `rope_parameters`."""
    params = d.get("rope_parameters")
    if d.get("rope_scaling"):
        theta, scaling = rope_settings(d["rope_scaling"], where, types=types)
    else:
        theta, scaling = rope_settings(params, where, field="rope_parameters", types=types)
    theta = d.get("rope_theta") or theta or (params or {}).get("rope_theta") or 10000.0
    return {"rope_theta": float(theta), "rope_scaling": scaling}


def base_fields(d: dict[str, Any], where: str, model_type: str) -> dict[str, Any]:
    """The fields the Llama-style decoder reads, with transformers' defaults for absent keys."""
    check_numbers(d, where)
    heads = d["num_attention_heads"]
    kv_heads = d.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise ConfigError(f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    act = d.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise unsupported(where, "hidden_act", act, ACTIVATIONS)
    return dict(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // heads,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        **global_rope(d, where),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
        hidden_act=act,
        model_type=model_type,
        initializer_range=float(d.get("initializer_range", 0.02)),
        hf_config_json=json.dumps(d, sort_keys=True),
    )


def layer_types(d: dict[str, Any], where: str, window: int | None) -> tuple[LayerSpec, ...] | None:
    """Per-layer specs from transformers' `layer_types` ("full_attention" | "sliding_attention"), or None
    when the config has none. A sliding layer attends to the last `window` keys."""
    types = d.get("layer_types")
    if types is None:
        return None
    n = d["num_hidden_layers"]
    if not isinstance(types, list) or len(types) != n:
        raise ConfigError(f"{where}: layer_types must list one entry per layer ({n}), found {types!r}")
    specs = []
    for i, t in enumerate(types):
        if t == "full_attention":
            specs.append(LayerSpec(None, ROPE_GLOBAL))
        elif t == "sliding_attention":
            if window is None:
                raise ConfigError(f"{where}: layer_types[{i}]='sliding_attention' but sliding_window is null")
            specs.append(LayerSpec(window, ROPE_GLOBAL))
        else:
            raise unsupported(where, f"layer_types[{i}]", t, ("full_attention", "sliding_attention"))
    return tuple(specs)
