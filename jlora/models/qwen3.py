"""Qwen3 dense (`Qwen3ForCausalLM`): the Llama decoder plus per-head q/k RMSNorm before rope.

    q = q_norm(x Wq) per head over head_dim;  k = k_norm(x Wk);  then rope, attention as Llama
    attention_bias applies to q, k, v and o (published checkpoints: none); head_dim is its own field
    (Qwen3-0.6B: 16 heads x 128 = 2048 > hidden 1024).

Sliding windows: transformers uses `sliding_window` only when `use_sliding_window` is true, on the layers
`layer_types` marks "sliding_attention" (by default those at index >= max_window_layers); read the same way.
"""
from __future__ import annotations

from typing import Any

from jlora.models.family import Family
from jlora.models.hf_fields import base_fields, layer_types


def read_qwen3(d: dict[str, Any], where: str) -> dict[str, Any]:
    fields = base_fields(d, where, "qwen3")
    bias = bool(d.get("attention_bias", False))
    window = d.get("sliding_window") if d.get("use_sliding_window") else None
    n = fields["num_hidden_layers"]
    specs = layer_types(d, where, window)
    if specs is None and window is not None:
        first = d.get("max_window_layers", 28)
        specs = layer_types({"num_hidden_layers": n, "layer_types": [
            "sliding_attention" if i >= first else "full_attention" for i in range(n)]}, where, window)
    return {**fields, "qkv_bias": bias, "o_bias": bias, "mlp_bias": False, "qk_norm": True,
            "sliding_window": window, "layer_specs": specs or ()}


def _qwen3(hidden, inter, layers, heads, kv, tie, ctx=40960):
    return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "head_dim": 128, "vocab_size": 151936, "rope_theta": 1000000.0,
            "rope_scaling": None, "max_position_embeddings": ctx, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": tie, "attention_bias": False, "hidden_act": "silu",
            "use_sliding_window": False, "sliding_window": None, "max_window_layers": layers}


# The config.json of each Qwen/Qwen3-* release (sizes, heads, tie_word_embeddings, context).
QWEN3_PRESETS = {
    "qwen3-0.6b": _qwen3(1024, 3072, 28, 16, 8, tie=True),
    "qwen3-1.7b": _qwen3(2048, 6144, 28, 16, 8, tie=True),
    "qwen3-4b": _qwen3(2560, 9728, 36, 32, 8, tie=True),
    "qwen3-8b": _qwen3(4096, 12288, 36, 32, 8, tie=False),
    "qwen3-14b": _qwen3(5120, 17408, 40, 40, 8, tie=False),
    "qwen3-32b": _qwen3(5120, 25600, 64, 64, 8, tie=False),
}

FAMILIES = (
    Family("qwen3", ("Qwen3ForCausalLM",), read_qwen3, QWEN3_PRESETS),
)
