"""Real Llama-family configs by name, as their config.json files define them (no weights)."""
from __future__ import annotations

from jlora.llama_config import LlamaConfig

_LLAMA3_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_type": "llama3"}


def _llama(hidden, inter, layers, heads, kv, vocab=128256, theta=500000.0, rope=None, tie=False, ctx=131072, eps=1e-5):
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "vocab_size": vocab, "rope_theta": theta, "rope_scaling": rope,
            "tie_word_embeddings": tie, "max_position_embeddings": ctx, "rms_norm_eps": eps}


PRESETS: dict[str, dict] = {
    "llama-2-7b": _llama(4096, 11008, 32, 32, 32, vocab=32000, theta=10000.0, ctx=4096, eps=1e-5),
    "llama-3-8b": _llama(4096, 14336, 32, 32, 8, ctx=8192),
    "llama-3-70b": _llama(8192, 28672, 80, 64, 8, ctx=8192),
    "llama-3.1-8b": _llama(4096, 14336, 32, 32, 8, rope=_LLAMA3_ROPE),
    "llama-3.1-70b": _llama(8192, 28672, 80, 64, 8, rope=_LLAMA3_ROPE),
    "llama-3.2-1b": _llama(2048, 8192, 16, 32, 8, rope={**_LLAMA3_ROPE, "factor": 32.0}, tie=True),
    "llama-3.2-3b": _llama(3072, 8192, 28, 24, 8, rope={**_LLAMA3_ROPE, "factor": 32.0}, tie=True),
    "mistral-7b": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
                   "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "vocab_size": 32768, "rope_theta": 1000000.0,
                   "sliding_window": None, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
                   "tie_word_embeddings": False},
    "qwen2.5-7b": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
                   "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                   "num_key_value_heads": 4, "vocab_size": 152064, "rope_theta": 1000000.0,
                   "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                   "use_sliding_window": False},
}


def preset_config(name: str) -> LlamaConfig:
    """The LlamaConfig of a built-in preset, e.g. `preset_config("llama-3.1-8b")`."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    return LlamaConfig.from_hf_dict(PRESETS[name], where=f"preset {name!r}")
