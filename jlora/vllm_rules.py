"""The rules vLLM applies when it loads a LoRA adapter (shared/REFERENCE.md section 2), checked offline.

`vllm_violations(config, tensor_names, max_lora_rank)` lists every rule an adapter breaks, so an export
can be refused before a server silently serves the base model instead.

Module names depend on the base's architecture. vLLM expects its supported LoRA modules expanded by the
model's `packed_modules_mapping`: Llama-style models map their fused `qkv_proj` to [q_proj, k_proj, v_proj]
and `gate_up_proj` to [gate_proj, up_proj], so adapters name the split modules; Phi-3 maps `qkv_proj` to
[qkv_proj] and `gate_up_proj` to [gate_up_proj], so adapters name the fused ones and q_proj is unknown.
jlora reads this from its family registry (`Family.target_modules`, jlora.models) by the base's model_type.
"""
from __future__ import annotations

import json

import re
from pathlib import Path

from jlora.convert.safetensors_io import tensor_shapes
from jlora.module_patterns import HEAD_MODULES, head_module
from jlora.models.family import ALL_LINEAR

MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
KNOWN_MODULES = frozenset(ALL_LINEAR + HEAD_MODULES)  # Llama-style models (and any model_type jlora does not know)
REJECTED_INITS = {"pissa", "olora", "corda", "loftq"}
WEIGHT_KEY = re.compile(r"^(?P<module>.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")


def smallest_max_lora_rank(r: int) -> int | None:
    """The smallest `--max-lora-rank` vLLM accepts that serves rank r (None above 512)."""
    return next((m for m in MAX_LORA_RANKS if m >= r), None)


def _families():
    from jlora.models.registry import FAMILIES  # on first use: importing the registry loads every family
    return FAMILIES


def vllm_modules(model_type: str | None = None) -> frozenset[str]:
    """The module names vLLM accepts in an adapter for a base of `model_type`: the family's LoRA targets plus
    embed_tokens and lm_head (None, or a model_type jlora does not know: Llama's names)."""
    family = _families().get(model_type)
    return KNOWN_MODULES if family is None else frozenset(family.target_modules + HEAD_MODULES)


def merged_only_fields(config: dict) -> dict:
    """The adapter config's fields for which vLLM refuses it outright while its merged model serves (the rules
    below whose advice is "serve the merged model"): {"use_dora": True} for DoRA; else the trained embedding/head
    fields set ({"modules_to_save": [...], "trainable_token_indices": ...}) when modules_to_save names only
    embed_tokens/lm_head; else {}."""
    if config.get("use_dora"):
        return {"use_dora": True}
    trained = {k: config[k] for k in ("modules_to_save", "trainable_token_indices") if config.get(k)}
    return trained if all(head_module(m) for m in config.get("modules_to_save") or []) else {}


def vllm_violations(config: dict, tensor_names, max_lora_rank: int = 16,
                    ranks: dict[str, int] | None = None, *, model_type: str | None = None) -> list[str]:
    """Every vLLM rule the adapter breaks; an empty list means a vLLM server with `max_lora_rank` serves it.

    `model_type`: the base's (config.json), which decides the module names vLLM knows (`vllm_modules`)."""
    known = vllm_modules(model_type)
    arch = model_type if model_type in _families() else "Llama"
    v = []
    if max_lora_rank not in MAX_LORA_RANKS:
        v.append(f"--max-lora-rank {max_lora_rank} is not one vLLM accepts: {list(MAX_LORA_RANKS)}")
    if not config.get("target_modules"):
        v.append("target_modules is missing or null: vLLM requires an explicit list")
    if config.get("use_dora"):
        v.append("use_dora=true: vLLM does not serve DoRA")
    if config.get("bias", "none") != "none":
        v.append(f"bias={config.get('bias')!r}: vLLM requires bias='none'")
    if config.get("lora_bias"):
        v.append("lora_bias=true: vLLM does not serve LoRA biases")
    mts = config.get("modules_to_save") or []
    bad_mts = [m for m in mts if m not in ("classifier", "score")]
    if bad_mts:
        v.append(f"modules_to_save={bad_mts}: vLLM only accepts classifier/score"
                 + ("; serve the merged model instead (jlora train --merge, or jlora.save_merged)"
                    if all(head_module(m) for m in bad_mts) else ""))
    if config.get("trainable_token_indices"):
        v.append("trainable_token_indices: vLLM loads no trained token rows (token_adapter weights), and since "
                 "late 2025 an adapter cannot add tokens (vllm#28382 removed LoRA extra vocabulary); serve the "
                 "merged model instead (jlora train --merge)")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.split("_")[0].lower() in REJECTED_INITS:
        v.append(f"init_lora_weights={init!r}: vLLM rejects {sorted(REJECTED_INITS)} initialisations")
    all_ranks = [config.get("r", 8), *(config.get("rank_pattern") or {}).values(), *(ranks or {}).values()]
    top = max(all_ranks)
    if top > max_lora_rank:
        need = smallest_max_lora_rank(top)
        v.append(f"rank {top} exceeds --max-lora-rank {max_lora_rank}"
                 + (f": start vLLM with --max-lora-rank {need}" if need else ": vLLM serves at most 512"))
    for name in tensor_names:
        m = WEIGHT_KEY.match(name)
        if m is None:
            v.append(f"weight {name!r}: vLLM raises 'unsupported LoRA weight' (only lora_A/lora_B.weight)")
        elif ".default." in name or ".default" in m.group("module").split(".")[-1:]:
            v.append(f"weight {name!r}: adapter name in the key")
        else:
            leaf = m.group("module").split(".")[-1]
            if leaf not in known:
                v.append(f"weight {name!r}: module {leaf!r} is not one vLLM knows for {arch} ({sorted(known)})")
    return v


def base_model_type(config: dict) -> str | None:
    """The model_type in the config.json of the adapter's base, when `base_model_name_or_path` is a local
    checkpoint directory (as jlora writes it for a local base); else None."""
    base = config.get("base_model_name_or_path")
    if not isinstance(base, str) or not (Path(base) / "config.json").is_file():
        return None
    try:
        return json.loads((Path(base) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def check_vllm_adapter(adapter_dir, max_lora_rank: int = 16, *, model_type: str | None = None) -> None:
    """Raises ValueError naming each broken vLLM rule of the adapter in `adapter_dir`.

    `model_type` (default: read from the base's local config.json, else Llama's names) picks the module names."""
    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    shapes = tensor_shapes(adapter_dir / "adapter_model.safetensors")
    ranks = {k: s[0] for k, s in shapes.items() if k.endswith("lora_A.weight")}
    problems = vllm_violations(config, list(shapes), max_lora_rank, ranks,
                               model_type=model_type or base_model_type(config))
    if problems:
        raise ValueError(f"{adapter_dir}: vLLM would not serve this adapter:\n  - " + "\n  - ".join(problems))


