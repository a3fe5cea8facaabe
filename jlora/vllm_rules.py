"""The rules vLLM applies when it loads a LoRA adapter (shared/REFERENCE.md section 2), checked offline.

`vllm_violations(config, tensor_names, max_lora_rank)` lists every rule an adapter breaks, so an export
can be refused before a server silently serves the base model instead.
"""
from __future__ import annotations

import json

import re
from pathlib import Path

from jlora.convert.safetensors_io import tensor_shapes

MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
KNOWN_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens",
                 "lm_head"}
REJECTED_INITS = {"pissa", "olora", "corda", "loftq"}
WEIGHT_KEY = re.compile(r"^(?P<module>.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")


def smallest_max_lora_rank(r: int) -> int | None:
    """The smallest `--max-lora-rank` vLLM accepts that serves rank r (None above 512)."""
    return next((m for m in MAX_LORA_RANKS if m >= r), None)


def vllm_violations(config: dict, tensor_names, max_lora_rank: int = 16,
                    ranks: dict[str, int] | None = None) -> list[str]:
    """Every vLLM rule the adapter breaks; an empty list means a vLLM server with `max_lora_rank` serves it."""
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
        v.append(f"modules_to_save={bad_mts}: vLLM only accepts classifier/score")
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
            if leaf not in KNOWN_MODULES:
                v.append(f"weight {name!r}: module {leaf!r} is not one vLLM knows for Llama ({sorted(KNOWN_MODULES)})")
    return v


def check_vllm_adapter(adapter_dir, max_lora_rank: int = 16) -> None:
    """Raises ValueError naming each broken vLLM rule of the adapter in `adapter_dir`."""
    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    shapes = tensor_shapes(adapter_dir / "adapter_model.safetensors")
    ranks = {k: s[0] for k, s in shapes.items() if k.endswith("lora_A.weight")}
    problems = vllm_violations(config, list(shapes), max_lora_rank, ranks)
    if problems:
        raise ValueError(f"{adapter_dir}: vLLM would not serve this adapter:\n  - " + "\n  - ".join(problems))


