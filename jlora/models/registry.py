"""model_type -> Family: the one table the loader, the converters, the presets and the planner read.

Adding a family: write jlora/models/<family>.py with a `FAMILIES` tuple of `Family` records (its config
reader and presets) and add the module to `_MODULES` below. Nothing else branches on model_type.
"""
from __future__ import annotations

from typing import Any

from jlora.models import gemma
from jlora.models import llama
from jlora.models import phi3
from jlora.models import qwen3
from jlora.models import smollm3
from jlora.models.family import ConfigError, Family

# One line per family module (helpers add theirs in parallel).
_MODULES = (
    llama,
    gemma,
    qwen3,
    phi3,
    smollm3,
)

FAMILIES: dict[str, Family] = {f.model_type: f for m in _MODULES for f in m.FAMILIES}

# transformers architecture class name -> model_type
SUPPORTED_ARCHITECTURES: dict[str, str] = {a: f.model_type for f in FAMILIES.values() for a in f.architectures}


def supported() -> str:
    return f"supported model_types: {', '.join(sorted(FAMILIES))} (architectures {', '.join(sorted(SUPPORTED_ARCHITECTURES))})"


def family_for(d: dict[str, Any], where: str = "config.json") -> Family:
    """The family of a transformers config dict: by its first known `architectures` entry, else by `model_type`."""
    archs = d.get("architectures") or []
    known = [a for a in archs if a in SUPPORTED_ARCHITECTURES]
    if known:
        return FAMILIES[SUPPORTED_ARCHITECTURES[known[0]]]
    model_type = d.get("model_type")
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    found = f"architectures {archs}" if archs else f"model_type {model_type!r}"
    raise ConfigError(f"{where}: {found} is not a model family jlora supports; {supported()}")


def config_fields(d: dict[str, Any], where: str = "config.json") -> dict[str, Any]:
    """The ModelConfig fields of a transformers config dict, read by its family's reader."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a JSON object, found {type(d).__name__}")
    return family_for(d, where).read(d, where)


def presets() -> dict[str, dict[str, Any]]:
    """Every family's presets: name -> config.json dict."""
    out: dict[str, dict[str, Any]] = {}
    for family in FAMILIES.values():
        for name, d in family.presets.items():
            if name in out:
                raise AssertionError(f"preset {name!r} is defined by two families")
            out[name] = d
    return out
