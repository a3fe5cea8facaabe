"""A LoRA adapter dir as written by PEFT, Unsloth or jlora, read as per-module factors without a base model.

    delta W (torch orientation, [out, in]) = scale * B @ A,   A = lora_A.weight [r, in], B = lora_B.weight [out, r]

Embedding adapters (`lora_embedding_A` [r, vocab], `lora_embedding_B` [hidden, r]) read the same way
(their delta is the transpose, with the same spectrum). `scale` follows PEFT: alpha / r or alpha / sqrt(r)
(`use_rslora`), with `rank_pattern` / `alpha_pattern` per module. Keys may carry PEFT's in-memory adapter
name (`.default.`). Tensors that are not LoRA factors (DoRA magnitudes, LoRA biases, modules_to_save) are
kept in `other`, so an export can name them instead of dropping them silently.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np

from jlora.convert.peft_adapter import CONFIG_FILE, PREFIX, WEIGHTS_FILE, normalise_key, read_adapter_weights
from jlora.convert.safetensors_io import CheckpointError
from jlora.lora_config import ALL_LINEAR, LoraConfig
from jlora.module_patterns import PatternError

FACTOR_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")
_ORDER = {name: i for i, name in enumerate(ALL_LINEAR)}


@dataclasses.dataclass
class ModuleFactors:
    name: str            # HF module name, e.g. "model.layers.3.mlp.up_proj"
    a: np.ndarray        # [r, in]
    b: np.ndarray        # [out, r]
    scale: float
    embedding: bool = False

    @property
    def r(self) -> int:
        return int(self.a.shape[0])

    @property
    def layer(self) -> int | None:
        m = re.search(r"\blayers\.(\d+)\.", self.name)
        return int(m.group(1)) if m else None

    @property
    def kind(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    def delta(self) -> np.ndarray:
        """scale * B @ A in float64, [out, in]: for tests and small modules only."""
        return self.scale * (self.b.astype(np.float64) @ self.a.astype(np.float64))


@dataclasses.dataclass
class Adapter:
    path: Path
    config: dict
    modules: list[ModuleFactors]
    other: dict[str, np.ndarray]

    def by_name(self) -> dict[str, ModuleFactors]:
        return {m.name: m for m in self.modules}


def resolve_adapter_dir(path) -> Path:
    """`path` if it holds adapter_config.json, else `path/adapter` (a `jlora train` run dir)."""
    path = Path(path)
    for candidate in (path, path / "adapter"):
        if (candidate / CONFIG_FILE).exists():
            return candidate
    raise CheckpointError(f"{path}: no {CONFIG_FILE} here or in {path / 'adapter'} "
                          f"(expected a PEFT adapter dir or a `jlora train` run dir)")


def sort_key(name: str):
    m = re.search(r"\blayers\.(\d+)\.", name)
    leaf = name.rsplit(".", 1)[-1]
    return (int(m.group(1)) if m else -1, _ORDER.get(leaf, len(_ORDER)), name)


def read_adapter(path, *, allow_pickle: bool = False) -> Adapter:
    """Reads the adapter in `path` (or `path/adapter`) into per-module factors and scales."""
    adapter_dir = resolve_adapter_dir(path)
    config = json.loads((adapter_dir / CONFIG_FILE).read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{adapter_dir / CONFIG_FILE}: peft_type={config.get('peft_type')!r}, "
                              f"expected a LORA adapter")
    parts: dict[str, dict[str, np.ndarray]] = {}
    other: dict[str, np.ndarray] = {}
    for key, value in read_adapter_weights(adapter_dir, allow_pickle).items():
        m = FACTOR_KEY.match(normalise_key(key))
        if m is None:
            other[key] = value
        else:
            parts.setdefault(m.group("module"), {})[m.group("part").split(".")[0]] = value
    try:  # rank_pattern / alpha_pattern keys come from the file: invalid or too costly ones fail by name
        rules = LoraConfig(r=int(config.get("r", 8)), lora_alpha=config.get("lora_alpha", 8),
                           use_rslora=bool(config.get("use_rslora", False)),
                           rank_pattern=dict(config.get("rank_pattern") or {}),
                           alpha_pattern=dict(config.get("alpha_pattern") or {}))
        rules.check_patterns(parts)
    except PatternError as e:
        raise CheckpointError(f"{adapter_dir / CONFIG_FILE}: {e}") from None
    modules = []
    for name in sorted(parts, key=sort_key):
        p = parts[name]
        embedding = "lora_embedding_A" in p or "lora_embedding_B" in p
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
        a, b = p.get(a_key), p.get(b_key)
        if a is None or b is None:
            raise CheckpointError(f"{adapter_dir}: {PREFIX}{name} has only {sorted(p)}: "
                                  f"{a_key} and {b_key} come in pairs")
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise CheckpointError(f"{adapter_dir}: {PREFIX}{name}: {a_key} {tuple(a.shape)} and {b_key} "
                                  f"{tuple(b.shape)} are not [r, in] and [out, r] of one rank")
        r = int(a.shape[0])
        if rules.rank_for(name) != r:
            raise CheckpointError(f"{adapter_dir}: {PREFIX}{name} has rank {r} but the config gives it "
                                  f"r={rules.rank_for(name)} (r / rank_pattern)")
        modules.append(ModuleFactors(name, a, b, float(rules.scaling_for(name)), embedding))
    if not modules:
        raise CheckpointError(f"{adapter_dir}: no lora_A / lora_B tensors found")
    return Adapter(adapter_dir, config, modules, other)
