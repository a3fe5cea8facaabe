"""The Llama family: Llama 2/3/3.x, Mistral and Qwen2 (Qwen2.5) — the decoder with no differences.

    h = embed(ids);  each layer: h += attn(rms(h));  h += mlp(rms(h));  logits = rms(h) @ W_head

They differ only in biases (Qwen2: q/k/v bias; Llama `attention_bias`: all four; `mlp_bias`) and
Mistral's sliding window (every layer). This file only reads their configs and names their presets.
"""
from __future__ import annotations

from typing import Any

from jlora.models.family import Family, LayerSpec
from jlora.models.hf_fields import base_fields, unsupported


def read_llama(d: dict[str, Any], where: str, model_type: str = "llama") -> dict[str, Any]:
    bias = bool(d.get("attention_bias", False))
    return {**base_fields(d, where, model_type), "qkv_bias": bias, "o_bias": bias,
            "mlp_bias": bool(d.get("mlp_bias", False))}


def read_mistral(d: dict[str, Any], where: str) -> dict[str, Any]:
    fields = read_llama(d, where, "mistral")
    window = d.get("sliding_window")
    fields["sliding_window"] = window
    fields["layer_specs"] = (LayerSpec(window),) * fields["num_hidden_layers"]
    return fields


def read_qwen2(d: dict[str, Any], where: str) -> dict[str, Any]:
    if d.get("use_sliding_window"):
        raise unsupported(where, "use_sliding_window", d["use_sliding_window"], [False])
    return {**base_fields(d, where, "qwen2"), "qkv_bias": True, "o_bias": False,
            "mlp_bias": bool(d.get("mlp_bias", False))}


_LLAMA3_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_type": "llama3"}


def _llama(hidden, inter, layers, heads, kv, vocab=128256, theta=500000.0, rope=None, tie=False, ctx=131072, eps=1e-5):
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "vocab_size": vocab, "rope_theta": theta, "rope_scaling": rope,
            "tie_word_embeddings": tie, "max_position_embeddings": ctx, "rms_norm_eps": eps}


LLAMA_PRESETS = {
    "llama-2-7b": _llama(4096, 11008, 32, 32, 32, vocab=32000, theta=10000.0, ctx=4096, eps=1e-5),
    "llama-3-8b": _llama(4096, 14336, 32, 32, 8, ctx=8192),
    "llama-3-70b": _llama(8192, 28672, 80, 64, 8, ctx=8192),
    "llama-3.1-8b": _llama(4096, 14336, 32, 32, 8, rope=_LLAMA3_ROPE),
    "llama-3.1-70b": _llama(8192, 28672, 80, 64, 8, rope=_LLAMA3_ROPE),
    "llama-3.2-1b": _llama(2048, 8192, 16, 32, 8, rope={**_LLAMA3_ROPE, "factor": 32.0}, tie=True),
    "llama-3.2-3b": _llama(3072, 8192, 28, 24, 8, rope={**_LLAMA3_ROPE, "factor": 32.0}, tie=True),
    # HuggingFaceTB/SmolLM2-1.7B: a LlamaForCausalLM (SmolLM3 is its own family, jlora/models/smollm3.py)
    "smollm2-1.7b": _llama(2048, 8192, 24, 32, 32, vocab=49152, theta=130000.0, tie=True, ctx=8192, eps=1e-5),
}
MISTRAL_PRESETS = {
    "mistral-7b": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
                   "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "vocab_size": 32768, "rope_theta": 1000000.0,
                   "sliding_window": None, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
                   "tie_word_embeddings": False},
}
QWEN2_PRESETS = {
    "qwen2.5-7b": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
                   "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                   "num_key_value_heads": 4, "vocab_size": 152064, "rope_theta": 1000000.0,
                   "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                   "use_sliding_window": False},
}

FAMILIES = (
    Family("llama", ("LlamaForCausalLM",), read_llama, LLAMA_PRESETS),
    Family("mistral", ("MistralForCausalLM",), read_mistral, MISTRAL_PRESETS),
    Family("qwen2", ("Qwen2ForCausalLM",), read_qwen2, QWEN2_PRESETS),
)
