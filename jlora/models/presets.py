"""Real configs by name, as their config.json files define them (no weights); each family file names its own."""
from __future__ import annotations

from jlora.models.config import ModelConfig
from jlora.models.registry import presets

PRESETS: dict[str, dict] = presets()


def preset_config(name: str) -> ModelConfig:
    """The ModelConfig of a built-in preset, e.g. `preset_config("llama-3.1-8b")`."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    return ModelConfig.from_hf_dict(PRESETS[name], where=f"preset {name!r}")
