"""Token-level cross-entropy, normalised by the target tokens of the whole optimizer step.

    loss = sum_{micro-batches m} sum_t mask_t * CE(logits_t, target_t)  /  sum_{all m, t} mask_t

so 8 x 1, 4 x 2 and 1 x 8 (batch x accumulation) give the same loss and gradient (Unsloth's fix).
The logits are computed in chunks of about `chunk_tokens` tokens (jlora.train.chunked_loss), so the
full `[tokens, vocab]` logits never exist at once; `chunk_tokens=None` computes them whole.
"""
from __future__ import annotations

import jax.numpy as jnp

from jlora.train.chunked_loss import DEFAULT_CHUNK_TOKENS, chunked_cross_entropy_sum
from jlora.trainable_tokens import trainable_head


def _head_has_dropout(model) -> bool:
    """An lm_head adapter with active dropout draws from an RNG stream: it runs unchunked (a scan body
    may not advance the stream)."""
    lora = getattr(getattr(model, "lm_head", None), "lora", None)
    dropout = getattr(lora, "dropout", None)
    return dropout is not None and not dropout.deterministic


def token_loss_sum(model, batch, *, chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS
                   ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(sum of masked token cross-entropies in float32, number of target tokens) for one micro-batch."""
    h = model.hidden_states(batch["inputs"], batch["positions"], batch["segment_ids"])
    if chunk_tokens is None or _head_has_dropout(model):
        chunk_tokens = batch["targets"].size  # one chunk: the whole logits
    mask = batch["loss_mask"].astype(jnp.float32)
    # a trained embedding/head copy or token rows: (head, its params), differentiated explicitly
    head, params = trainable_head(model) or (model.logits_from_hidden, None)
    total = chunked_cross_entropy_sum(head, h, batch["targets"], mask, chunk_tokens=chunk_tokens, head_params=params)
    return total, jnp.sum(mask)
