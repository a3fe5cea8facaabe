"""Gemma 2 (`Gemma2ForCausalLM`) and Gemma 3 text (`Gemma3ForCausalLM`): the shared decoder with Gemma's
differences as data. Semantics as transformers 5.24 computes them (modeling_gemma2.py, modeling_gemma3.py):

    h = embed(ids) * sqrt(hidden)          the scale rounded to float32, then to the compute dtype (bf16: 55.5
                                           for sqrt(3072) = 55.43), and multiplied in that dtype
    rms(x) = (x32 / sqrt(mean(x32^2) + eps)) * (1 + w32), cast to the dtype at the end (Llama casts before
                                           scaling by w); weights are stored as w, so a zero w is the identity
    each layer:  h += post_attention_norm(attn(input_norm(h)))
                 h += post_feedforward_norm(mlp(pre_feedforward_norm(h)))       (four norms per layer)
    mlp(x) = down(gelu_tanh(gate(x)) * up(x))                                   (hidden_activation)
    attn: s = (q k^T) * query_pre_attn_scalar^-0.5  (not head_dim^-0.5; Gemma 2 27B: 144 with head_dim 128)
          Gemma 2: s = cap * tanh(s / cap), cap = attn_logit_softcapping, before the mask
          sliding layers see the last `sliding_window` keys, themselves included (q - k < w, as Mistral
          and jlora.attention.masks); full layers see all earlier keys
    logits = rms(h) @ embed^T (tied by default), then cap * tanh(logits / cap), cap = final_logit_softcapping

Layer pattern: `layer_types` ("sliding_attention" | "full_attention") when the config has it; otherwise
Gemma 2 alternates (layer i slides when i is even) and Gemma 3 slides unless (i + 1) % sliding_window_pattern
== 0 (default 6: five local layers, then one global).

Gemma 3 adds:
- q_norm, k_norm: the Gemma RMSNorm (1 + w) per head over head_dim, on q and k before rope;
- two rope tables: sliding layers rotate with base rope_local_base_freq (10^4), unscaled; full layers with
  rope_theta (10^6) and rope_scaling (linear, factor 8 on 4B/12B/27B). transformers 5 writes them as
  `rope_parameters = {"full_attention": {...}, "sliding_attention": {...}}`; 4.x configs (the hub's) as
  rope_theta / rope_local_base_freq / rope_scaling, read here the way transformers converts them;
- no attention soft-cap: transformers' Gemma3Attention never passes `attn_logit_softcapping` to its attention
  function (every backend), so the field is ignored here too; the final soft-cap applies when set.

Refused with a ConfigError naming field and value: use_bidirectional_attention (Gemma 3 embedding models),
rope types jlora has no table for, non-positive soft-caps, an activation other than the tanh gelu.
"""
from __future__ import annotations

import copy
import json
from typing import Any

import numpy as np

from jlora.models.family import ROPE_GLOBAL, ROPE_LOCAL, ConfigError, Family, LayerSpec
from jlora.models.hf_fields import base_fields, layer_types, rope_settings, unsupported

# transformers' config defaults for keys a config.json may leave out (Gemma2Config / Gemma3TextConfig).
_GEMMA2_DEFAULTS = dict(head_dim=256, query_pre_attn_scalar=256, sliding_window=4096, max_position_embeddings=8192,
                        rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh",
                        final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
_GEMMA3_DEFAULTS = dict(_GEMMA2_DEFAULTS, max_position_embeddings=131072, final_logit_softcapping=None,
                        attn_logit_softcapping=None, sliding_window_pattern=6)
_GEMMA3_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}
_ACTIVATIONS = ("gelu_pytorch_tanh",)


def _cap(d: dict[str, Any], key: str, where: str) -> float | None:
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise ConfigError(f"{where}: {key} must be a positive number or null, found {v!r}")
    return float(v)


def _common(d: dict[str, Any], where: str, model_type: str) -> dict[str, Any]:
    """The fields Gemma 2 and 3 read alike; `d` already has the family's defaults filled in."""
    if d.get("use_bidirectional_attention"):
        raise unsupported(where, "use_bidirectional_attention", d["use_bidirectional_attention"], [False, None])
    act = d["hidden_activation"]
    if act not in _ACTIVATIONS:
        raise unsupported(where, "hidden_activation", act, _ACTIVATIONS)
    qpas = d["query_pre_attn_scalar"]
    if isinstance(qpas, bool) or not isinstance(qpas, (int, float)) or not qpas > 0:
        raise ConfigError(f"{where}: query_pre_attn_scalar must be a positive number, found {qpas!r}")
    fields = base_fields({**d, "hidden_act": act}, where, model_type)
    bias = bool(d.get("attention_bias", False))
    return {**fields, "hidden_act": act, "qkv_bias": bias, "o_bias": bias, "mlp_bias": False,
            "norm_weight_offset": 1.0, "sandwich_norms": True,
            "embedding_scale": float(np.float32(d["hidden_size"] ** 0.5)),
            "query_pre_attn_scalar": float(qpas), "sliding_window": d.get("sliding_window"),
            "final_logit_softcapping": _cap(d, "final_logit_softcapping", where)}


def _specs(d: dict[str, Any], where: str, sliding) -> tuple[LayerSpec, ...]:
    """layer_types when present, else `sliding(i)` says whether layer i slides."""
    window = d.get("sliding_window")
    specs = layer_types(d, where, window)
    if specs is None:
        n = d["num_hidden_layers"]
        specs = layer_types({"num_hidden_layers": n, "layer_types": [
            "sliding_attention" if sliding(i) else "full_attention" for i in range(n)]}, where, window)
    return specs


def read_gemma2(d: dict[str, Any], where: str) -> dict[str, Any]:
    full = {**_GEMMA2_DEFAULTS, **d}
    fields = _common(full, where, "gemma2")
    return {**fields, "attn_logit_softcapping": _cap(full, "attn_logit_softcapping", where),
            "layer_specs": _specs(full, where, lambda i: i % 2 == 0),
            "hf_config_json": json.dumps(d, sort_keys=True)}


def _gemma3_rope(d: dict[str, Any], where: str) -> dict[str, Any]:
    """Both rope tables, converted as Gemma3TextConfig.convert_rope_params_to_dict does: `rope_parameters`
    per layer type (5.x), else {"rope_type": "default"}; a 4.x `rope_scaling` updates the full-attention entry;
    rope_theta / rope_local_base_freq fill the thetas only where the entries lack one."""
    params = copy.deepcopy(d.get("rope_parameters")) or {}
    if not isinstance(params, dict) or set(params) - set(_GEMMA3_THETA):
        raise ConfigError(f"{where}: rope_parameters must map full_attention / sliding_attention to rope "
                          f"settings (transformers 5 Gemma3), found {d.get('rope_parameters')!r}")
    for kind in _GEMMA3_THETA:
        params[kind] = dict(params.get(kind) or {"rope_type": "default"})
    scaling = d.get("rope_scaling")
    if scaling:
        if "type" in scaling and "rope_type" not in scaling:  # transformers 5.24 would keep "default", unscaled
            raise ConfigError(f"{where}: rope_scaling.type={scaling['type']!r} (the pre-4.45 key) is read by "
                              f"transformers 5 as rope_type 'default' for Gemma 3, dropping the scaling; write "
                              f"rope_scaling.rope_type instead")
        params["full_attention"].update(scaling)
    params["full_attention"].setdefault("rope_theta", d.get("rope_theta") or _GEMMA3_THETA["full_attention"])
    params["sliding_attention"].setdefault("rope_theta",
                                           d.get("rope_local_base_freq") or _GEMMA3_THETA["sliding_attention"])
    out = {}
    for kind, prefix in (("full_attention", "rope"), ("sliding_attention", "rope_local")):
        theta, scaling = rope_settings(params[kind], where, field=f"rope_parameters.{kind}")
        out[f"{prefix}_theta"], out[f"{prefix}_scaling"] = float(theta), scaling
    return out


def read_gemma3(d: dict[str, Any], where: str) -> dict[str, Any]:
    full = {**_GEMMA3_DEFAULTS, **d}
    pattern = full["sliding_window_pattern"]
    if "layer_types" not in d and (isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 1):
        raise ConfigError(f"{where}: sliding_window_pattern must be a positive integer, found {pattern!r}")
    fields = _common(full, where, "gemma3_text")
    specs = _specs(full, where, lambda i: (i + 1) % pattern != 0)
    specs = tuple(LayerSpec(s.sliding_window, ROPE_LOCAL if s.sliding_window else ROPE_GLOBAL) for s in specs)
    return {**fields, **_gemma3_rope(full, where), "qk_norm": True, "attn_logit_softcapping": None,
            "layer_specs": specs, "hf_config_json": json.dumps(d, sort_keys=True)}


def _gemma2(hidden, inter, layers, heads, kv, head_dim, qpas):
    """google/gemma-2-* config.json."""
    return {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "head_dim": head_dim, "query_pre_attn_scalar": qpas, "vocab_size": 256000,
            "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 8192, "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, "sliding_window": 4096, "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0, "attention_bias": False, "tie_word_embeddings": True}


def _gemma3(hidden, inter, layers, heads, kv, head_dim=256, qpas=256, vocab=262208, window=1024, ctx=131072,
            scaling=None):
    """google/gemma-3-* config.json (`text_config` of the 4B/12B/27B multimodal releases, as a text model)."""
    return {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "head_dim": head_dim, "query_pre_attn_scalar": qpas, "vocab_size": vocab,
            "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": ctx, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": scaling,
            "sliding_window": window, "sliding_window_pattern": 6, "attn_logit_softcapping": None,
            "final_logit_softcapping": None, "attention_bias": False, "tie_word_embeddings": True}


_LINEAR8 = {"rope_type": "linear", "factor": 8.0}
GEMMA2_PRESETS = {
    "gemma-2-2b": _gemma2(2304, 9216, 26, 8, 4, 256, 256),
    "gemma-2-9b": _gemma2(3584, 14336, 42, 16, 8, 256, 256),
    "gemma-2-27b": _gemma2(4608, 36864, 46, 32, 16, 128, 144),
}
GEMMA3_PRESETS = {
    "gemma-3-1b": _gemma3(1152, 6912, 26, 4, 1, vocab=262144, window=512, ctx=32768),
    "gemma-3-4b": _gemma3(2560, 10240, 34, 8, 4, scaling=_LINEAR8),
    "gemma-3-12b": _gemma3(3840, 15360, 48, 16, 8, scaling=_LINEAR8),
    "gemma-3-27b": _gemma3(5376, 21504, 62, 32, 16, head_dim=128, qpas=168, scaling=_LINEAR8),
}

FAMILIES = (
    Family("gemma2", ("Gemma2ForCausalLM",), read_gemma2, GEMMA2_PRESETS),
    Family("gemma3_text", ("Gemma3ForCausalLM",), read_gemma3, GEMMA3_PRESETS),
)
