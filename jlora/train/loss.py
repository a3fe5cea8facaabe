"""Token-level cross-entropy, normalised by the target tokens of the whole optimizer step.

    loss = sum_{micro-batches m} sum_t mask_t * CE(logits_t, target_t)  /  sum_{all m, t} mask_t

so 8 x 1, 4 x 2 and 1 x 8 (batch x accumulation) give the same loss and gradient (Unsloth's fix).
"""
from __future__ import annotations

import jax.numpy as jnp
import optax


def token_loss_sum(model, batch) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(sum of masked token cross-entropies in float32, number of target tokens) for one micro-batch."""
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"]).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(ce * mask), jnp.sum(mask)
