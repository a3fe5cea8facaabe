"""Rank-selection heuristics (shared/seeds; Unsloth, PEFT, the LoRA and rsLoRA papers) as data.

- Task -> rank: 4-8 style/format, 8-16 domain adaptation, 16-32 a new task, 32-64 complex reasoning
  and RL (GRPO, DPO), 64-128 very large data or 70B+ models. Start at r=16 when unsure.
- lora_alpha = r (scaling 1, Unsloth's default) or 2r (scaling 2: use a lower learning rate).
- Above r=64 use rsLoRA (`use_rslora`, scaling alpha / sqrt(r), arXiv 2312.03732).
- Memory-constrained: r=8 on q_proj, v_proj only.
- vLLM serves ranks up to its `--max-lora-rank` (one of 1, 8, 16, 32, 64, 128, 256, 320, 512; default 16);
  Unsloth starts vLLM with 64 for RL.
"""
from __future__ import annotations

from typing import NamedTuple

from jlora.vllm_rules import smallest_max_lora_rank

RSLORA_ABOVE = 64
VLLM_DEFAULT_MAX_LORA_RANK = 16
LARGE_MODEL_PARAMS = 60e9  # "70B+" models


class TaskRanks(NamedTuple):
    task: str
    low: int
    high: int
    targets: str


TASK_RANKS = (
    TaskRanks("simple style / format adaptation", 4, 8, "attention"),
    TaskRanks("domain adaptation (medical, legal, ...)", 8, 16, "all-linear"),
    TaskRanks("a new task (classification, extraction, ...)", 16, 32, "all-linear"),
    TaskRanks("complex reasoning, instruction following, RL (GRPO, DPO)", 32, 64, "all-linear"),
    TaskRanks("very large dataset / complex task, or a 70B+ model", 64, 128, "all-linear"),
)


def alpha_choices(r: int) -> tuple[int, int]:
    """(r, 2r): scaling 1 and 2 under plain LoRA."""
    return r, 2 * r


def use_rslora(r: int) -> bool:
    return r > RSLORA_ABOVE


def max_lora_rank(r: int) -> int | None:
    """The vLLM `--max-lora-rank` to start the server with for an adapter of rank r."""
    return smallest_max_lora_rank(r)


def advice_lines(total_params: int) -> list[str]:
    """The advice `jlora ranks` prints after its tables."""
    lines = ["Rank by task (start at r=16 when unsure; then `jlora sweep --ranks 4,8,16,32` and keep the rank "
             "with the lowest eval loss):"]
    width = max(len(t.task) for t in TASK_RANKS)
    for t in TASK_RANKS:
        flags = " use_rslora" if use_rslora(t.high) else ""
        lines.append(f"  {t.task:<{width}}  {f'r={t.low}-{t.high}':<8}  lora_alpha=r or 2r{flags:<11}  "
                     f"targets {t.targets:<10}  vllm --max-lora-rank {max_lora_rank(t.high)}")
    if total_params >= LARGE_MODEL_PARAMS:
        lines.append(f"  This model has {total_params / 1e9:.0f}B parameters: large models benefit from r=64-128.")
    lines += [
        "Memory-constrained: r=8 on q_proj, v_proj only (--targets qv).",
        "lora_alpha: = r gives scaling 1 (Unsloth's default, r=16 alpha=16); = 2r gives scaling 2 (use a lower lr).",
        f"Above r={RSLORA_ABOVE}: --use-rslora (scaling alpha/sqrt(r)) keeps the update size stable as r grows.",
        f"vLLM: start the server with --max-lora-rank >= the adapter's rank (allowed 1, 8, 16, 32, 64, 128, 256, 320, "
        f"512; default {VLLM_DEFAULT_MAX_LORA_RANK}); r=16 serves with the default, Unsloth uses 64 for RL. "
        f"`jlora export --max-lora-rank N` cuts a larger adapter to fit.",
    ]
    return lines
