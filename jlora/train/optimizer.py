"""AdamW over adapter parameters only, with warmup then cosine or linear decay and global-norm clipping.

    lr(t) = peak * t / warmup                               for t < warmup
          = peak * (f + (1 - f) * (1 + cos(pi * u)) / 2)    cosine,  u = (t - warmup) / (total - warmup)
          = peak * (1 - (1 - f) * u)                         linear,  f = final_lr_fraction
"""
from __future__ import annotations

import optax


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


def make_optimizer(schedule: optax.Schedule, *, weight_decay: float = 0.0, max_grad_norm: float | None = 1.0,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm else []
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.chain(*parts)
