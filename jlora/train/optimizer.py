"""AdamW over adapter parameters only, with warmup then cosine or linear decay and global-norm clipping.

    lr(t) = peak * t / warmup                               for t < warmup
          = peak * (f + (1 - f) * (1 + cos(pi * u)) / 2)    cosine,  u = (t - warmup) / (total - warmup)
          = peak * (1 - (1 - f) * u)                         linear,  f = final_lr_fraction

LoRA+ (Hayou et al. 2024, arXiv 2402.12354; PEFT's ``create_loraplus_optimizer``): with
``loraplus_lr_ratio = k`` the parameters split into PEFT's groups

    groupA            lora_A (every other trainable matrix)    lr(t)        weight_decay
    groupB            lora_B and every 1-D parameter           k * lr(t)    weight_decay
    groupB_no_decay   the above, named *bias* or *norm*        k * lr(t)    0

and each group runs its own AdamW. PEFT's fourth group (LoRA on embeddings, ``loraplus_lr_embedding``)
is always empty here: jlora does not adapt ``embed_tokens`` with LoRA. Trained embedding/head copies
(``modules_to_save``) and token rows (``trainable_token_indices``) are 2-D, so groupA, as in PEFT (its copies are
plain modules, not LoRA embeddings). PEFT gives every decayed group
``loraplus_weight_decay``; here it is the run's ``weight_decay``.
"""
from __future__ import annotations

from collections.abc import Mapping

import optax

LORAPLUS_GROUPS = ("groupA", "groupB", "groupB_no_decay")


def learning_rate_schedule(peak: float, total_steps: int, warmup_steps: int, kind: str = "cosine",
                           final_fraction: float = 0.0) -> optax.Schedule:
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup_steps, 1)
    if kind == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=final_fraction)
    elif kind == "linear":
        decay = optax.linear_schedule(peak, peak * final_fraction, decay_steps)
    elif kind == "constant":
        decay = optax.constant_schedule(peak)
    else:
        raise ValueError(f"lr schedule {kind!r} is not one of cosine, linear, constant")
    if warmup_steps == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps), decay], [warmup_steps])


def loraplus_group(name: str, ndim: int) -> str:
    """PEFT's LoRA+ group of the flat adapter parameter ``name`` (e.g. ``...q_proj.lora.b``)."""
    parts = name.split(".")
    if parts[-1] == "b" or "lora_B" in name or ndim == 1:
        return "groupB_no_decay" if ("bias" in name or "norm" in name) else "groupB"
    return "groupA"


def loraplus_groups(params: Mapping) -> dict[str, str]:
    """``{name: group}`` for a flat ``{name: array}`` adapter dict (see ``loraplus_group``)."""
    return {name: loraplus_group(name, len(p.shape)) for name, p in params.items()}


def make_optimizer(schedule: optax.Schedule, *, weight_decay: float = 0.0, max_grad_norm: float | None = 1.0,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   loraplus_lr_ratio: float | None = None) -> optax.GradientTransformation:
    """Global-norm clipping (over all adapters together), then AdamW; LoRA+ groups when a ratio is given.

    With ``loraplus_lr_ratio`` the optimizer must be initialised on a flat ``{name: array}`` dict
    (``SplitModel.params()``): the groups are read from the names.
    """
    parts = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm else []
    if loraplus_lr_ratio is None:
        parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
        return optax.chain(*parts)
    if not loraplus_lr_ratio > 0:
        raise ValueError(f"{loraplus_lr_ratio=} must be positive (PEFT recommends >= 1, e.g. 16)")
    ratio = float(loraplus_lr_ratio)
    scaled = lambda step: ratio * schedule(step)  # noqa: E731
    transforms = {
        "groupA": optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay),
        "groupB": optax.adamw(scaled, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay),
        "groupB_no_decay": optax.adamw(scaled, b1=b1, b2=b2, eps=eps, weight_decay=0.0),
    }
    parts.append(optax.multi_transform(transforms, loraplus_groups))
    return optax.chain(*parts)
