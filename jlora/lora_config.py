"""`LoraConfig`: PEFT's field names with Unsloth's defaults, and PEFT's matching rules.

- `target_modules` as a list matches module name m when m == entry or m ends with "." + entry;
  as a string it is a full regex match (`re.fullmatch`), except the presets below.
- `rank_pattern` / `alpha_pattern`: key k applies to m when `re.match(rf"(.*\\.)?({k})$", m)`; first key wins.
  Both run in jlora/module_patterns.py, which bounds the work a pattern from a file can cause.
- scaling = alpha / r, or alpha / sqrt(r) with `use_rslora`.
- `use_dora`: DoRA (arXiv 2402.09353), a trainable magnitude per output feature (jlora/dora.py).
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

from jlora import module_patterns
from jlora.lora_layer import lora_scaling
from jlora.models.family import ALL_LINEAR  # the seven Llama-style projections, one spelling

TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "all-linear": ALL_LINEAR,
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qv": ("q_proj", "v_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}


@dataclasses.dataclass
class LoraConfig:
    r: int = 16
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    bias: str = "none"
    target_modules: Sequence[str] | str = dataclasses.field(default_factory=lambda: list(ALL_LINEAR))
    use_rslora: bool = False
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    init_lora_weights: bool | str = True
    # Trainable embeddings and head (jlora/trainable_tokens.py), PEFT's fields: full copies of these modules
    # (embed_tokens, lm_head), and/or only these token rows ([ids] for embed_tokens, or {module: [ids]}).
    modules_to_save: list[str] | None = None
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    use_dora: bool = False

    def __post_init__(self):
        _check_rank(self.r, "r")
        for key, r in self.rank_pattern.items():
            _check_rank(r, f"rank_pattern[{key!r}]")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.bias != "none":
            raise ValueError(f"bias={self.bias!r} is not supported: jlora (and vLLM) train no biases; use bias='none'")
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"use_dora must be True or False, got {self.use_dora!r}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}")
        if isinstance(self.target_modules, str) and self.target_modules in TARGET_PRESETS:
            self.target_modules = list(TARGET_PRESETS[self.target_modules])
        self.modules_to_save, self.trainable_token_indices = _check_trainable_embeddings(
            self.modules_to_save, self.trainable_token_indices)
        module_patterns.check(self.target_modules,
                              {"rank_pattern": self.rank_pattern, "alpha_pattern": self.alpha_pattern})

    def matches(self, module_name: str) -> bool:
        """PEFT's target rule on an HF module name such as `model.layers.0.self_attn.q_proj`."""
        return module_patterns.target_matches(self.target_modules, module_name)

    def rank_for(self, module_name: str) -> int:
        return _pattern_value(self.rank_pattern, module_name, self.r, "rank_pattern")

    def alpha_for(self, module_name: str) -> float:
        return _pattern_value(self.alpha_pattern, module_name, self.lora_alpha, "alpha_pattern")

    def check_patterns(self, module_names: Iterable[str]) -> None:
        """Runs every rule on every name now, so a pattern too costly to match (`PatternError`) fails
        before a model is changed; the answers are cached for the calls that follow."""
        for name in module_names:
            self.matches(name)
            self.rank_for(name)
            self.alpha_for(name)

    def scaling_for(self, module_name: str) -> float:
        return lora_scaling(self.rank_for(module_name), self.alpha_for(module_name), self.use_rslora)


def _module_name(name, field: str) -> str:
    """head_module(name), or an error naming the field."""
    leaf = module_patterns.head_module(name)
    if leaf is None:
        raise ValueError(f"{field}: {name!r} is not a module jlora can train; expected one of "
                         f"{list(module_patterns.HEAD_MODULES)}")
    return leaf


def _token_ids(ids, field: str) -> list[int]:
    ids = list(ids) if isinstance(ids, (list, tuple)) else None
    if not ids or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
        raise ValueError(f"{field}: expected a non-empty list of token ids (integers >= 0), found {ids!r}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{field}: token ids {ids} repeat an id")
    return ids


def _check_trainable_embeddings(saved, indices):
    """modules_to_save as a list of distinct module names; trainable_token_indices as [ids] or {module: [ids]};
    a module may not be in both (PEFT's rule: it is trained fully or by rows, not both)."""
    if saved is not None:
        saved = [saved] if isinstance(saved, str) else saved
        saved = list(dict.fromkeys(_module_name(m, "modules_to_save") for m in saved)) or None
    if indices is not None:
        if isinstance(indices, dict):
            indices = {_module_name(k, "trainable_token_indices"): _token_ids(v, f"trainable_token_indices[{k!r}]")
                       for k, v in indices.items()}
        else:
            indices = _token_ids(indices, "trainable_token_indices")
        both = set(saved or ()) & (set(indices) if isinstance(indices, dict) else {"embed_tokens"})
        if both:
            raise ValueError(f"{sorted(both)} is in modules_to_save and trainable_token_indices: train it fully "
                             f"or by rows, not both")
    return saved, indices


def _check_rank(r, what):
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"LoRA rank {what} must be a positive integer, got {r!r}")


def _pattern_value(pattern: dict, module_name: str, default, field: str):
    key = module_patterns.pattern_key(pattern, module_name, field)
    return default if key is None else pattern[key]
