"""One jitted optimizer step over micro-batches with exact gradient accumulation, and an eval step.

A step's batch has arrays [accum, micro_batch, seq]. Each micro-batch contributes
grad(sum of its token losses) / (target tokens of the whole step), accumulated in float32 by a scan.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jlora.train.chunked_loss import DEFAULT_CHUNK_TOKENS
from jlora.train.loss import token_loss_sum
from jlora.train.state import SplitModel


def make_train_step(split: SplitModel, tx: optax.GradientTransformation, *, schedule=None,
                    loss_chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS):
    """step(params, opt_state, frozen, batch, key, step) -> (params, opt_state, metrics).

    loss_chunk_tokens: about how many tokens' logits exist at once (jlora.train.chunked_loss); None: all.

    metrics: loss (of the params before the update), grad_norm, target_tokens, params_finite (whether every
    updated adapter weight is finite), lr (with `schedule`).
    """

    def step(params, opt_state, frozen, batch, key, step_index):
        total = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
        step_key = jax.random.fold_in(key, step_index)

        def micro(carry, xs):
            grads, loss = carry
            mb, i = xs

            def loss_fn(p):
                model = split.model(p, frozen, jax.random.fold_in(step_key, i))
                s, _ = token_loss_sum(model, mb, chunk_tokens=loss_chunk_tokens)
                return s / total

            value, g = jax.value_and_grad(loss_fn)(params)
            grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
            return (grads, loss + value), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        accum = batch["inputs"].shape[0]
        (grads, loss), _ = jax.lax.scan(micro, (zeros, jnp.zeros((), jnp.float32)), (batch, jnp.arange(accum)))
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "target_tokens": total,
                   "params_finite": finite}  # of the updated params: a non-finite one is never saved
        if schedule is not None:
            metrics["lr"] = schedule(step_index)
        return params, opt_state, metrics

    return step


def make_eval_step(split: SplitModel, *, loss_chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS):
    """eval_step(params, frozen, batch [b, seq]) -> (sum of token losses, target tokens)."""

    def eval_step(params, frozen, batch):
        return token_loss_sum(split.model(params, frozen), batch, chunk_tokens=loss_chunk_tokens)

    return eval_step
