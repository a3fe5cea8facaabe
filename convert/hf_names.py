"""The declarative map between HF tensor names and jlora variables.

HF `...q_proj.weight` [out, in]  <->  jlora `...q_proj.kernel` [in, out]   (transposed)
HF `...q_proj.bias`, `*norm.weight`, `embed_tokens.weight`  <->  same layout
"""
from __future__ import annotations

import dataclasses
import re

from flax import nnx

from jlora.models.config import ModelConfig

# Buffers some older checkpoints carry that are recomputed, never loaded (transformers ignores them too).
IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")

# transformers + bitsandbytes store a 4-bit `P.weight` as `P.weight` (packed codes) plus these
# `P.weight.<suffix>` tensors (jlora/nf4/bnb_layout.py).
BNB_PART = re.compile(r"^(?P<weight>.+\.weight)(?:\.(?:absmax|quant_map|nested_absmax|nested_quant_map"
                      r"|quant_state\..+))?$")


@dataclasses.dataclass(frozen=True)
class Entry:
    path: tuple  # attribute path in the jlora model, e.g. ("model", "layers", 0, "mlp", "up_proj", "kernel")
    transpose: bool

    def hf_shape(self, jlora_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(reversed(jlora_shape)) if self.transpose else tuple(jlora_shape)


def tensor_map(config: ModelConfig) -> dict[str, Entry]:
    """HF tensor name -> Entry, for every tensor a checkpoint of `config` must hold.

    Read from the config's flags (jlora.models.config), never from its model_type: qk_norm adds
    `self_attn.{q,k}_norm.weight`, sandwich_norms adds `{pre,post}_feedforward_layernorm.weight`.
    """
    m: dict[str, Entry] = {"model.embed_tokens.weight": Entry(("model", "embed_tokens", "weight"), False),
                           "model.norm.weight": Entry(("model", "norm", "weight"), False)}
    if not config.tie_word_embeddings:
        m["lm_head.weight"] = Entry(("lm_head", "kernel"), True)
    norms = ["input_layernorm", "post_attention_layernorm"]
    if config.sandwich_norms:
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    for i in range(config.num_hidden_layers):
        base = ("model", "layers", i)
        for norm in norms:
            m[f"model.layers.{i}.{norm}.weight"] = Entry(base + (norm, "weight"), False)
        if config.qk_norm:
            for norm in ("q_norm", "k_norm"):
                m[f"model.layers.{i}.self_attn.{norm}.weight"] = Entry(base + ("self_attn", norm, "weight"), False)
        for parent, name, has_bias in config.projections():
            prefix = f"model.layers.{i}.{parent}.{name}"
            m[f"{prefix}.weight"] = Entry(base + (parent, name, "kernel"), True)
            if has_bias:
                m[f"{prefix}.bias"] = Entry(base + (parent, name, "bias"), False)
    return m


def bnb_weight_name(name: str) -> str | None:
    """`P.weight` for any tensor of a bitsandbytes 4-bit weight (`P.weight`, `P.weight.absmax`, ...), else None."""
    m = BNB_PART.match(name)
    return m.group("weight") if m else None


def get_attr_path(obj, path: tuple):
    for p in path:
        obj = obj[p] if isinstance(p, int) else getattr(obj, p)
    return obj


def variable_at(model: nnx.Module, path: tuple) -> nnx.Variable:
    return get_attr_path(model, path)
