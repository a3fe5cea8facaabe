"""Trainable-parameter counts of LoRA adapters from a model's shapes alone (no weights).

Each adapted projection W [out, in] gets A [r, in] and B [out, r]:

    trainable = sum over adapted projections of r * (in + out)

and the percentage is PEFT's `trainable%`: trainable / (base parameters + trainable) * 100.
Works on the built-in presets (`llama-3.1-8b`) and on any checkpoint dir's config.json.
"""
from __future__ import annotations

from pathlib import Path

from jlora.llama_config import LlamaConfig
from jlora.lora_config import TARGET_PRESETS
from jlora.models.fused import fused_targets
from jlora.presets import PRESETS, preset_config

# The target presets `jlora ranks` tabulates, smallest first.
TABLE_TARGETS = ("qv", "attention", "all-linear")
# Ranks 1, 2, 4, ... 256.
TABLE_RANKS = tuple(2 ** k for k in range(9))


def resolve_model(spec: str) -> tuple[LlamaConfig, str]:
    """(config, description) for a preset name or a checkpoint dir holding config.json."""
    if spec in PRESETS:
        return preset_config(spec), f"preset {spec}"
    path = Path(spec)
    if path.is_dir():
        from jlora.convert.hf_checkpoint import read_config
        return LlamaConfig.from_hf_dict(read_config(path), where=str(path / "config.json")), str(path)
    raise ValueError(f"--model {spec!r} is neither a checkpoint dir (with config.json) nor a built-in preset; "
                     f"presets: {sorted(PRESETS)}")


def target_suffixes(targets: str | list[str], config: LlamaConfig | None = None) -> tuple[str, ...]:
    """Projection names of a preset (`qv`, `attention`, `all-linear`, `mlp`) or a list of names; with a
    `config` whose projections are fused (Phi-3), Llama's names become the fused modules they make up."""
    if isinstance(targets, str):
        targets = list(TARGET_PRESETS[targets]) if targets in TARGET_PRESETS else \
            [t.strip() for t in targets.split(",") if t.strip()]
    known = tuple(config.linear_shapes()) if config is not None else \
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    if config is not None and config.fused_projections:
        targets = fused_targets(targets)
    unknown = [t for t in targets if t not in known]
    if unknown:
        raise ValueError(f"targets {unknown} are not projections of this model; expected a preset "
                         f"{sorted(TARGET_PRESETS)} or names from {list(known)}")
    return tuple(targets)


def lora_parameter_count(config: LlamaConfig, r: int, targets: str | list[str] = "all-linear") -> int:
    """r * (in + out) summed over the targeted projections of every layer."""
    shapes = config.linear_shapes()
    return r * config.num_hidden_layers * sum(sum(shapes[t]) for t in target_suffixes(targets, config))


def base_parameter_count(config: LlamaConfig) -> int:
    """Every parameter of the base model (embeddings, projections, biases, norms, untied head)."""
    c = config
    h = c.hidden_size
    shapes = c.linear_shapes()
    per_layer = sum(i * o for i, o in shapes.values()) + 2 * h  # projections + two RMSNorms
    per_layer += (2 * c.head_dim if c.qk_norm else 0) + (2 * h if c.sandwich_norms else 0)  # Qwen3 / Gemma norms
    if c.qkv_bias:
        per_layer += c.q_features + 2 * c.kv_features
    if c.o_bias:
        per_layer += h
    if c.mlp_bias:
        per_layer += 2 * c.intermediate_size + h
    head = 0 if c.tie_word_embeddings else c.vocab_size * h
    return c.vocab_size * h + c.num_hidden_layers * per_layer + h + head


def linear_parameter_count(config: LlamaConfig) -> int:
    """Parameters in the seven projections (what NF4 quantizes)."""
    return config.num_hidden_layers * sum(i * o for i, o in config.linear_shapes().values())


def trainable_percent(config: LlamaConfig, trainable: int) -> float:
    """PEFT's trainable%: trainable / (base + trainable) * 100."""
    return 100.0 * trainable / (base_parameter_count(config) + trainable)
