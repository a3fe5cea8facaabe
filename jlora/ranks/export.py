"""An adapter rewritten so that every vLLM version serves it identically, optionally cut to a maximum rank.

For each module with rank r_m and scaling s_m (PEFT's rules: alpha / r or alpha / sqrt(r), per-module
patterns), and a target `max_lora_rank` N:

- r_m <= N (or no N): the factors are kept; B is multiplied by s_m / s_out and both are zero-padded to
  the common rank r_out, so delta W = s_out * B' @ A' is unchanged exactly.
- r_m > N: delta W is replaced by its best rank-N approximation (truncate.py), reporting the energy kept.

The written config has one r (= r_out), one lora_alpha, and empty rank_pattern / alpha_pattern: older vLLM
releases ignored alpha_pattern, and folding per-module scales into lora_B makes that irrelevant. s_out is
the source's default scaling (lora_alpha rescaled to r_out, rounded to an integer when the source's was);
an adapter that needs no change is copied with its values bit-exact (as float32).
Everything else (use_dora, bias, modules_to_save, non-LoRA tensors) is carried over as found, so the vLLM
check names it instead of the export dropping it silently. Non-finite factors (NaN or inf, e.g. from a
diverged run) are an error naming the tensor: vLLM would load them and serve NaN logits.

A directory is a previous `jlora export` when it holds export_report.json (REPORT_FILE, written by every
export, as a JSON object with a "modules" list); `jlora export` replaces such a directory as a whole.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np

from jlora.atomic_files import write_json
from jlora.convert.safetensors_io import write_atomic
from jlora.lora_config import ALL_LINEAR
from jlora.lora_layer import lora_scaling
from jlora.ranks.adapter import CONFIG_FILE, PREFIX, WEIGHTS_FILE, Adapter
from jlora.ranks.truncate import pad_rank, truncate
from jlora.vllm_rules import base_model_type, vllm_violations

VLLM_DEFAULT_MAX_LORA_RANK = 16
REPORT_FILE = "export_report.json"


@dataclasses.dataclass
class ModuleExport:
    module: str
    r: int               # rank in the source
    rank: int            # rank kept (before zero padding to the common r)
    energy_kept: float   # 1.0 unless truncated
    truncated: bool
    folded: bool         # its scale differed from the export's and went into lora_B


@dataclasses.dataclass
class Export:
    config: dict
    tensors: dict[str, np.ndarray]
    modules: list[ModuleExport]
    scale: float         # every module's scaling in the export

    @property
    def folded(self) -> bool:
        return any(m.folded for m in self.modules)

    @property
    def truncated(self) -> bool:
        return any(m.truncated for m in self.modules)


def explicit_target_modules(names: list[str], *, every_layer: bool = True) -> list[str]:
    """Module-name suffixes when each layer 0..L-1 carries the same projections (and `every_layer`: the source
    config adapts every layer, i.e. a target list without layers_to_transform), else full names for the
    layered modules; modules outside the layers (embed_tokens, lm_head) by their suffix."""
    def leaf(n):
        return n.rsplit(".", 1)[-1]

    def order(x):
        return ALL_LINEAR.index(x) if x in ALL_LINEAR else len(ALL_LINEAR), x

    layers: dict[int, set[str]] = {}
    outside = []
    for n in names:
        m = re.search(r"\blayers\.(\d+)\.", n)
        if m:
            layers.setdefault(int(m.group(1)), set()).add(leaf(n))
        else:
            outside.append(leaf(n))
    leaves = set().union(*layers.values()) if layers else set()
    grid = every_layer and sorted(layers) == list(range(len(layers))) and all(
        v == leaves for v in layers.values())
    layered = sorted(leaves, key=order) if grid else sorted(n for n in names if re.search(r"\blayers\.\d+\.", n))
    return layered + sorted(set(outside), key=order)


def _alpha_out(config: dict, r_out: int) -> tuple[float, float]:
    """(lora_alpha, scaling) for the export: the source's default scaling at rank r_out."""
    r, alpha, rs = int(config.get("r", 8)), config.get("lora_alpha", 8), bool(config.get("use_rslora", False))
    if r_out == r:
        return alpha, lora_scaling(r, alpha, rs)
    s0 = lora_scaling(r, alpha, rs)
    new = s0 * (math.sqrt(r_out) if rs else r_out)
    if float(alpha).is_integer():
        new = max(1, round(new))
    return new, lora_scaling(r_out, new, rs)


def check_finite(adapter: Adapter) -> None:
    """Raises naming the first tensor that holds NaN or inf (and how many of its values do)."""
    named = []
    for m in adapter.modules:
        parts = ("lora_embedding_A", "lora_embedding_B") if m.embedding else ("lora_A.weight", "lora_B.weight")
        named += [(f"{PREFIX}{m.name}.{parts[0]}", m.a), (f"{PREFIX}{m.name}.{parts[1]}", m.b)]
    named += [(k, v) for k, v in adapter.other.items() if np.issubdtype(np.asarray(v).dtype, np.floating)]
    for key, value in named:
        bad = int(np.size(value) - np.count_nonzero(np.isfinite(np.asarray(value, np.float32))))
        if bad:
            raise ValueError(f"{adapter.path}: {key} has {bad} non-finite values (NaN or inf) of {np.size(value)}; "
                             f"expected finite weights (did the run diverge?); nothing written")


def build_export(adapter: Adapter, max_lora_rank: int | None = None) -> Export:
    """The exported config and tensors (in memory) and what happened to each module."""
    src = adapter.config
    check_finite(adapter)
    if src.get("fan_in_fan_out"):
        raise ValueError(f"{adapter.path}: fan_in_fan_out=true is not a Llama-family layout")
    if max_lora_rank is not None and max_lora_rank < 1:
        raise ValueError(f"--max-lora-rank must be a positive integer, got {max_lora_rank}")
    kept = {m.name: min(m.r, max_lora_rank) if max_lora_rank else m.r for m in adapter.modules}
    r_out = max(kept.values())
    alpha_out, s_out = _alpha_out(src, r_out)
    tensors, report = {}, []
    for m in adapter.modules:
        k = kept[m.name]
        if k < m.r:
            t = truncate(m.a, m.b, m.scale, k, scale_out=s_out)
            a, b, e = t.a, t.b, t.energy_kept
        elif m.scale == s_out:
            a, b, e = m.a, m.b, 1.0
        else:
            a, b, e = m.a, m.b.astype(np.float64) * (m.scale / s_out), 1.0
        a, b = pad_rank(np.asarray(a, np.float32), np.asarray(b, np.float32), r_out)
        suffix = ("lora_embedding_A", "lora_embedding_B") if m.embedding else ("lora_A.weight", "lora_B.weight")
        tensors[f"{PREFIX}{m.name}.{suffix[0]}"] = np.ascontiguousarray(a)
        tensors[f"{PREFIX}{m.name}.{suffix[1]}"] = np.ascontiguousarray(b)
        report.append(ModuleExport(m.name, m.r, k, e, k < m.r, k == m.r and m.scale != s_out))
    tensors.update({k: np.asarray(v) for k, v in adapter.other.items()})
    config = {
        "peft_type": "LORA", "task_type": src.get("task_type") or "CAUSAL_LM",
        "r": r_out, "lora_alpha": alpha_out, "lora_dropout": src.get("lora_dropout", 0.0),
        "target_modules": explicit_target_modules(
            [m.name for m in adapter.modules],
            every_layer=isinstance(src.get("target_modules"), list) and src.get("layers_to_transform") is None),
        "bias": src.get("bias", "none"), "use_rslora": bool(src.get("use_rslora", False)),
        "use_dora": bool(src.get("use_dora", False)), "modules_to_save": src.get("modules_to_save"),
        "init_lora_weights": src.get("init_lora_weights", True),
        "rank_pattern": {}, "alpha_pattern": {}, "fan_in_fan_out": False,
        "base_model_name_or_path": src.get("base_model_name_or_path"), "inference_mode": True,
        "layers_to_transform": None, "layers_pattern": None, "revision": src.get("revision"),
    }
    if src.get("lora_bias"):
        config["lora_bias"] = True
    for key in ("trainable_token_indices", "ensure_weight_tying"):  # carried as found (PEFT >= 0.15 fields)
        if src.get(key) is not None:
            config[key] = src[key]
    return Export(config, tensors, report, s_out)


def export_violations(export: Export, max_lora_rank: int | None) -> list[str]:
    """vLLM's rules (jlora.vllm_rules) against a server started with `max_lora_rank` (vLLM's default 16)."""
    server = max_lora_rank or VLLM_DEFAULT_MAX_LORA_RANK
    ranks = {m.module: m.rank for m in export.modules}
    return vllm_violations(export.config, list(export.tensors), server, ranks,
                           model_type=base_model_type(export.config))  # Phi-3 keeps qkv_proj, Llama splits it


def write_export(export: Export, out_dir) -> None:
    """adapter_model.safetensors + adapter_config.json of `export` into `out_dir` (each file atomically)."""
    out_dir = Path(out_dir)
    write_atomic(out_dir / WEIGHTS_FILE, export.tensors, metadata={"format": "pt"})
    write_json(out_dir / CONFIG_FILE, export.config)


def is_previous_export(path) -> bool:
    """True when `path` holds a REPORT_FILE that `jlora export` wrote (see the module docstring)."""
    try:
        report = json.loads((Path(path) / REPORT_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and isinstance(report.get("modules"), list)
