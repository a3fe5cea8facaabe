"""The Llama-family architecture as one frozen dataclass, read from a transformers config.json.

Llama 2/3/3.1/3.2, Mistral and Qwen2 share one decoder: RMSNorm -> grouped-query attention with
rotary embeddings -> RMSNorm -> SwiGLU MLP. They differ only in the fields below.
"""
from __future__ import annotations

import dataclasses
import json
from functools import cached_property
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


class ConfigError(ValueError):
    """A config.json that jlora cannot build a model from."""


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # sorted items of the HF dict
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    max_position_embeddings: int = 4096
    model_type: str = "llama"
    initializer_range: float = 0.02
    hf_config_json: str = dataclasses.field(default="{}", compare=False, repr=False)

    @cached_property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    @cached_property
    def hf_config(self) -> dict[str, Any]:
        return json.loads(self.hf_config_json)

    @cached_property
    def q_features(self) -> int:
        return self.num_attention_heads * self.head_dim

    @cached_property
    def kv_features(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each adaptable projection, by HF module name suffix."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_features),
            "k_proj": (h, self.kv_features),
            "v_proj": (h, self.kv_features),
            "o_proj": (self.q_features, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], *, where: str = "config.json") -> "LlamaConfig":
        """Reads a transformers config dict (4.x `rope_scaling`/`rope_theta` or 5.x `rope_parameters`)."""
        archs = d.get("architectures") or []
        model_type = d.get("model_type")
        known = [a for a in archs if a in SUPPORTED_ARCHITECTURES]
        if known:
            model_type = SUPPORTED_ARCHITECTURES[known[0]]
        elif model_type not in SUPPORTED_ARCHITECTURES.values():
            raise ConfigError(
                f"{where}: architecture {archs or model_type!r} is not in the Llama family jlora supports; "
                f"supported: {sorted(SUPPORTED_ARCHITECTURES)} (model_type {sorted(SUPPORTED_ARCHITECTURES.values())})"
            )
        required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
        missing = [k for k in required if d.get(k) is None]
        if missing:
            raise ConfigError(f"{where}: missing required fields {missing}")
        sizes = required + ["num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window"]
        for k in sizes:
            v = d.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"{where}: {k} must be a positive integer, found {v!r}")
        for k in ("rms_norm_eps", "rope_theta", "initializer_range"):
            v = d.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ConfigError(f"{where}: {k} must be a number, found {v!r}")
        heads = d["num_attention_heads"]
        kv_heads = d.get("num_key_value_heads") or heads
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        if heads % kv_heads:
            raise ConfigError(f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
        rope = dict(d.get("rope_parameters") or {})
        scaling = d.get("rope_scaling") or {k: v for k, v in rope.items() if k != "rope_theta"}
        scaling = dict(scaling or {})
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise ConfigError(f"{where}: rope type {rope_type!r} is not supported; supported: default, linear, llama3")
        if rope_type != "default":
            scaling["rope_type"] = rope_type
            scaling.pop("type", None)
        theta = d.get("rope_theta") or rope.get("rope_theta") or 10000.0
        attention_bias = bool(d.get("attention_bias", False))
        qwen = model_type == "qwen2"
        window = None
        if model_type == "mistral":
            window = d.get("sliding_window")
        elif qwen and d.get("use_sliding_window"):
            raise ConfigError(f"{where}: Qwen2 with use_sliding_window=true is not supported")
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=tuple(sorted(scaling.items())) if rope_type != "default" else None,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=qwen or attention_bias,
            o_bias=attention_bias and not qwen,
            mlp_bias=bool(d.get("mlp_bias", False)),
            sliding_window=window,
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            model_type=model_type,
            initializer_range=float(d.get("initializer_range", 0.02)),
            hf_config_json=json.dumps(d, sort_keys=True),
        )
