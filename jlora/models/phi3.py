"""Phi-3 / Phi-3.5 / Phi-4 (`Phi3ForCausalLM`, model_type "phi3"): the Llama decoder with four differences.

1. Fused projections (`fused_projections`): `self_attn.qkv_proj` [hidden -> q + 2 kv] whose output columns
   are q, then k, then v; `mlp.gate_up_proj` [hidden -> 2 * intermediate] whose first half is the gate:
   `mlp(x) = down_proj(up * silu(gate))`. LoRA adapts the fused modules whole, as PEFT does on this
   architecture (one A, one B per fused module), and vLLM serves them under those names (its Phi3
   `packed_modules_mapping` is `qkv_proj -> [qkv_proj]`, `gate_up_proj -> [gate_up_proj]`).
2. Partial rotary (`partial_rotary_factor`, Phi-4-mini 0.75): only the first
   rotary_dim = int(head_dim * factor) dims of each head rotate; inv_freq uses rotary_dim as its d.
3. longrope (`rope_scaling.type` "longrope"; "su" and "yarn" are read as longrope, as transformers does):
       inv_freq_j = 1 / (ext_j * theta^(2j / rotary_dim)),  ext = long_factor if max(position) + 1 >
       original_max_position_embeddings else short_factor (one choice for the whole batch, as transformers);
       cos, sin scaled by attention_factor = sqrt(1 + ln(s) / ln(original)), s = max_position_embeddings /
       original_max_position_embeddings (1 when s <= 1; `factor` / `attention_factor` in the dict win).
4. No biases anywhere; `sliding_window` (when set) applies to every layer.

Nothing else differs (RMSNorm, silu, untied or tied head). Dropout fields (resid_pdrop, embd_pdrop,
attention_dropout) are training-time only in transformers and ignored, as for every family.
"""
from __future__ import annotations

import json
import math
from typing import Any

from jlora.models.family import ConfigError, Family, LayerSpec
from jlora.models.hf_fields import base_fields, unsupported

TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
ROPE_TYPES = ("default", "longrope")
_ALIASES = {"su": "longrope", "yarn": "longrope"}  # transformers' Phi3Config renames these


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def read_rope(d: dict[str, Any], where: str, head_dim: int) -> dict[str, Any]:
    """rope_theta, rope_scaling (sorted items; None for the default rope) and partial_rotary_factor."""
    params = dict(d.get("rope_parameters") or {})
    scaling = dict(d.get("rope_scaling") or params)
    field = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
    theta = d.get("rope_theta") or scaling.get("rope_theta") or params.get("rope_theta") or 10000.0
    factor = d.get("partial_rotary_factor", scaling.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0)))
    if not _number(factor) or not 0 < factor <= 1 or int(head_dim * factor) < 2 or int(head_dim * factor) % 2:
        raise ConfigError(f"{where}: partial_rotary_factor={factor!r} is not supported; it must be in (0, 1] "
                          f"and leave an even number of rotary dims of head_dim={head_dim}")
    if not _number(theta):
        raise ConfigError(f"{where}: rope_theta must be a number, found {theta!r}")
    rotary_dim = int(head_dim * factor)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    kind = _ALIASES.get(kind, kind)
    if kind not in ROPE_TYPES:
        raise unsupported(where, f"{field}.rope_type", kind, ROPE_TYPES)
    out = {"rope_theta": float(theta), "rope_scaling": None, "partial_rotary_factor": float(factor)}
    if kind == "default":
        return out
    longrope = {"rope_type": "longrope"}
    for name in ("short_factor", "long_factor"):
        f = scaling.get(name)
        if not isinstance(f, list) or len(f) != rotary_dim // 2 or not all(_number(x) and x > 0 for x in f):
            raise ConfigError(f"{where}: {field}.{name} must list {rotary_dim // 2} positive numbers (rotary_dim "
                              f"{rotary_dim} / 2), found {f!r}")
        longrope[name] = tuple(float(x) for x in f)
    # transformers: the top-level field (a Phi3Config attribute, default 4096) wins over the rope dict's
    original = d.get("original_max_position_embeddings", scaling.get("original_max_position_embeddings", 4096))
    if isinstance(original, bool) or not isinstance(original, int) or original < 2:
        raise ConfigError(f"{where}: original_max_position_embeddings must be an integer >= 2, found {original!r}")
    s = scaling.get("factor")
    s = d.get("max_position_embeddings", 4096) / original if s is None else s
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if s <= 1.0 else math.sqrt(1 + math.log(s) / math.log(original))
    if not _number(attention) or attention <= 0:
        raise ConfigError(f"{where}: {field}.attention_factor must be a positive number, found {attention!r}")
    longrope.update(original_max_position_embeddings=original, attention_factor=float(attention))
    out["rope_scaling"] = tuple(sorted(longrope.items()))
    return out


def read_phi3(d: dict[str, Any], where: str) -> dict[str, Any]:
    plain = {k: v for k, v in d.items() if k not in ("rope_scaling", "rope_parameters", "partial_rotary_factor")}
    plain.setdefault("rms_norm_eps", 1e-5)  # Phi3Config's default
    fields = base_fields(plain, where, "phi3")
    fields.update(read_rope(d, where, fields["head_dim"]))
    window = d.get("sliding_window")
    fields.update(fused_projections=True, qkv_bias=False, o_bias=False, mlp_bias=False, sliding_window=window,
                  layer_specs=(LayerSpec(window),) * fields["num_hidden_layers"],
                  hf_config_json=json.dumps(d, sort_keys=True))
    return fields


def _phi3(hidden, inter, layers, heads, kv, vocab, ctx, original, theta, window, tie, rope=None, partial=None,
          tokens=(1, 32000, 32000)):
    d = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": hidden,
         "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
         "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": ctx,
         "original_max_position_embeddings": original, "rope_theta": theta, "rope_scaling": rope,
         "sliding_window": window, "tie_word_embeddings": tie, "rms_norm_eps": 1e-5, "hidden_act": "silu",
         "bos_token_id": tokens[0], "eos_token_id": tokens[1], "pad_token_id": tokens[2]}
    if partial is not None:
        d["partial_rotary_factor"] = partial
    return d


# microsoft/Phi-4-mini-instruct config.json rope_scaling (short factors all 1.0).
_PHI4_MINI_LONG = [
    1, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817, 2.187582649, 2.446418898,
    2.735880826, 3.059592084, 3.421605075, 3.826451687, 4.279200023, 4.785517845, 5.351743533, 5.984965424,
    6.693110555, 7.485043894, 8.370679318, 9.36110372, 10.4687158, 11.70738129, 13.09260651, 14.64173252,
    16.37415215, 18.31155283, 20.47818807, 22.90118105, 25.61086418, 28.64115884, 32.03, 32.1, 32.13, 32.23,
    32.6, 32.61, 32.64, 32.66, 32.7, 32.71, 32.93, 32.97, 33.28, 33.49, 33.5, 44.16, 47.77]

PRESETS = {
    # microsoft/Phi-3-mini-4k-instruct
    "phi-3-mini-4k": _phi3(3072, 8192, 32, 32, 32, 32064, 4096, 4096, 10000.0, 2047, False),
    # microsoft/phi-4
    "phi-4": _phi3(5120, 17920, 40, 40, 10, 100352, 16384, 16384, 250000.0, None, False,
                   tokens=(100257, 100265, 100349)),
    # microsoft/Phi-4-mini-instruct
    "phi-4-mini": _phi3(3072, 8192, 32, 24, 8, 200064, 131072, 4096, 10000.0, 262144, True,
                        rope={"type": "longrope", "short_factor": [1.0] * 48, "long_factor": _PHI4_MINI_LONG},
                        partial=0.75, tokens=(199999, 199999, 199999)),
}

FAMILIES = (
    Family("phi3", ("Phi3ForCausalLM",), read_phi3, PRESETS, target_modules=TARGETS, peft_default_targets=None),
)
