"""ModelConfig: one frozen dataclass describing every supported decoder, read from a transformers config.json.

Every difference between families is a field with the Llama value as its default, so a family reader
(jlora/models/<family>.py) only fills fields and the decoder (jlora/models/decoder.py) is written once.
Per-layer differences are static `LayerSpec`s in `layer_specs` (window, rope table); see jlora/models/__init__.py.
"""
from __future__ import annotations

import dataclasses
import json
from functools import cached_property
from typing import Any

from jlora.models.family import ROPE_GLOBAL, ROPE_LOCAL, ROPE_NONE, ConfigError, LayerSpec
from jlora.models.registry import SUPPORTED_ARCHITECTURES, config_fields

__all__ = ["ConfigError", "LayerSpec", "ModelConfig", "SUPPORTED_ARCHITECTURES"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
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
    # The window of the sliding layers (which layers slide: layer_specs; by default every layer uses it).
    sliding_window: int | None = None
    max_position_embeddings: int = 4096
    model_type: str = "llama"
    initializer_range: float = 0.02
    # --- family differences, as data (defaults: Llama) ---
    hidden_act: str = "silu"                     # MLP: down(act(gate(x)) * up(x)); or gelu_pytorch_tanh (Gemma)
    norm_weight_offset: float = 0.0              # RMSNorm scale is (offset + w): Gemma 1.0, normalised in float32
    embedding_scale: float | None = None         # h = embed(ids) * scale in the compute dtype (Gemma: sqrt(hidden))
    qk_norm: bool = False                        # per-head RMSNorm over head_dim on q and k before rope (Qwen3, Gemma3)
    sandwich_norms: bool = False                 # Gemma2/3: norms after attention and around the MLP (decoder.py)
    attn_logit_softcapping: float | None = None  # scores s -> cap * tanh(s / cap)  (Gemma2)
    final_logit_softcapping: float | None = None  # logits -> cap * tanh(logits / cap)  (Gemma2)
    query_pre_attn_scalar: float | None = None   # attention scale query_pre_attn_scalar ** -0.5 (Gemma); None: head_dim
    fused_projections: bool = False              # Phi-3: one qkv_proj and one gate_up_proj (HF names)
    partial_rotary_factor: float = 1.0           # rope rotates the first int(head_dim * f) dims of a head (Phi-4-mini)
    rope_local_theta: float | None = None        # base of the "local" rope table (Gemma3 rope_local_base_freq)
    rope_local_scaling: tuple[tuple[str, Any], ...] | None = None
    layer_specs: tuple[LayerSpec, ...] = ()      # one per layer; () -> every layer LayerSpec(sliding_window, global)
    hf_config_json: str = dataclasses.field(default="{}", compare=False, repr=False)

    def __post_init__(self):
        specs = tuple(self.layer_specs) or (LayerSpec(self.sliding_window, ROPE_GLOBAL),)
        if not all(isinstance(s, LayerSpec) for s in specs):
            raise ConfigError(f"{self.model_type}: layer_specs must be LayerSpecs, found {specs!r}")
        if len(specs) != self.num_hidden_layers:
            # `dataclasses.replace(config, num_hidden_layers=n)` (the planner's 2-layer traces) keeps the
            # layer pattern: layer i takes the spec at i mod the pattern's period.
            p = _period(specs)
            specs = tuple(specs[i % p] for i in range(self.num_hidden_layers))
        object.__setattr__(self, "layer_specs", specs)
        if any(s.rope == ROPE_LOCAL for s in specs) and self.rope_local_theta is None:
            raise ConfigError(f"{self.model_type}: a layer uses the local rope table but rope_local_theta is None")

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], *, where: str = "config.json") -> "ModelConfig":
        """Reads a transformers config dict through its family's reader (jlora.models.registry)."""
        return cls(**config_fields(d, where))

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

    @cached_property
    def attention_scale(self) -> float:
        """Multiplies q k^T: query_pre_attn_scalar ** -0.5, or head_dim ** -0.5."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @cached_property
    def rope_kinds(self) -> tuple[str, ...]:
        """The rope tables some layer uses ("global", "local"), in that order; "none" needs no table."""
        used = {s.rope for s in self.layer_specs}
        return tuple(k for k in (ROPE_GLOBAL, ROPE_LOCAL) if k in used)

    @cached_property
    def layer_pattern(self) -> int:
        """The shortest period p with layer_specs[i] == layer_specs[i % p] for all i: a scanned stack
        groups layers by their position in this period (1 for Llama, 2 for Gemma2, 6 for Gemma3)."""
        return _period(self.layer_specs)

    @cached_property
    def rotary_dim(self) -> int:
        """How many leading dims of each head rope rotates (the rest pass through): int(head_dim * factor)."""
        return int(self.head_dim * self.partial_rotary_factor)

    def projections(self) -> tuple[tuple[str, str, bool], ...]:
        """(parent module, HF name, has bias) of each adaptable projection of a layer, in the layer's order:
        q, k, v, o, gate, up, down; with fused_projections qkv_proj, o_proj, gate_up_proj, down_proj."""
        if self.fused_projections:
            return (("self_attn", "qkv_proj", self.qkv_bias), ("self_attn", "o_proj", self.o_bias),
                    ("mlp", "gate_up_proj", self.mlp_bias), ("mlp", "down_proj", self.mlp_bias))
        return (*(("self_attn", n, self.qkv_bias) for n in ("q_proj", "k_proj", "v_proj")),
                ("self_attn", "o_proj", self.o_bias),
                *(("mlp", n, self.mlp_bias) for n in ("gate_proj", "up_proj", "down_proj")))

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each adaptable projection, by HF module name suffix."""
        h, i = self.hidden_size, self.intermediate_size
        if self.fused_projections:
            return {"qkv_proj": (h, self.q_features + 2 * self.kv_features), "o_proj": (self.q_features, h),
                    "gate_up_proj": (h, 2 * i), "down_proj": (i, h)}
        return {
            "q_proj": (h, self.q_features),
            "k_proj": (h, self.kv_features),
            "v_proj": (h, self.kv_features),
            "o_proj": (self.q_features, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }


def _period(specs: tuple[LayerSpec, ...]) -> int:
    n = len(specs)
    return next(p for p in range(1, n + 1) if all(specs[i] == specs[i % p] for i in range(n)))


LlamaConfig = ModelConfig  # the name this class had when it described the Llama family only
ROPE_KINDS = (ROPE_GLOBAL, ROPE_LOCAL, ROPE_NONE)
