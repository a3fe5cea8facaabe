"""Fused projections (`ModelConfig.fused_projections`; Phi-3, Phi-4): one Linear where Llama has two or three.

    qkv_proj:     [hidden -> q + k + v]   output columns: q (heads * head_dim), then k, then v (kv_heads * head_dim)
    gate_up_proj: [hidden -> 2 * inter]   first half the gate, second half up:  mlp(x) = down(act(gate) * up)

LoRA adapts a fused module whole: one A [in, r] and one B [r, q + k + v], the delta spread over q, k and v
(PEFT on Phi3ForCausalLM; vLLM's Phi3 `packed_modules_mapping` maps `qkv_proj` to itself). So LoRA targets
given with Llama's split names (jlora's default list, Unsloth's, the "attention" / "mlp" presets) mean, on
a fused model, the fused modules they make up, when they name every part of one; naming only some of its
parts (q_proj and v_proj without k_proj) is an error, since the fused module has a single adapter.
"""
from __future__ import annotations

from typing import Sequence

FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
PART_OF = {part: fused for fused, parts in FUSED.items() for part in parts}


def split_qkv(y, q_features: int, kv_features: int):
    """q, k, v from the output of qkv_proj (last axis: q, then k, then v)."""
    return y[..., :q_features], y[..., q_features:q_features + kv_features], y[..., q_features + kv_features:]


def split_gate_up(y):
    """gate, up from the output of gate_up_proj (last axis: gate first)."""
    half = y.shape[-1] // 2
    return y[..., :half], y[..., half:]


def fused_targets(target_modules: Sequence[str] | str) -> list[str] | str:
    """A `target_modules` list with split names replaced by the fused module they make up (see the module
    docstring); a regex string is returned as is (PEFT matches it against the model's real names).

    Entries keep their prefix: ["layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj",
    "layers.0.self_attn.v_proj"] -> ["layers.0.self_attn.qkv_proj"]. Raises ValueError naming the fused
    module when an entry names only some of its parts."""
    if isinstance(target_modules, str):
        return target_modules
    out: dict[str, None] = {}
    groups: dict[tuple[str, str], set[str]] = {}
    for entry in target_modules:
        head, _, leaf = entry.rpartition(".")
        fused = PART_OF.get(leaf)
        if fused is None:
            out[entry] = None
            continue
        groups.setdefault((head, fused), set()).add(leaf)
        out[f"{head}.{fused}" if head else fused] = None
    for (head, fused), parts in groups.items():
        missing = [p for p in FUSED[fused] if p not in parts]
        if missing:
            where = f"{head}." if head else ""
            raise ValueError(
                f"target_modules names {sorted(where + p for p in parts)} but not {[where + p for p in missing]}: "
                f"this model fuses {list(FUSED[fused])} into one {fused!r} with a single LoRA adapter (as PEFT and "
                f"vLLM name it on Phi-3); target {where + fused!r} (or every one of its parts), or none of them")
    return list(out)
