"""Choosing the next token from the logits: greedy or sampled, in float32, in transformers' order.

    repetition penalty  s_i -> s_i * p  if s_i < 0  else  s_i / p,   for every token i already in the row
                        (prompt and generated tokens; left padding excluded), applied in greedy mode too
    temperature         s -> s / T                       (T == 0: greedy, argmax of the penalised logits)
    top-k               keep the tokens with s_i >= the k-th largest s (ties kept)
    top-p               keep the smallest set of most likely tokens whose probability reaches p:
                        token i (probabilities sorted descending) is kept when the mass before it is < p
    draw                categorical(softmax(s)) over the kept tokens

as transformers' RepetitionPenalty, Temperature, TopK and TopP processors in that order. A draw is a
function of (seed, row index in the batch, step) and the logits only: a fixed seed reproduces a run.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 = greedy; top_k None/0 = off; top_p 1.0 = off; repetition_penalty 1.0 = off."""
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), found {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), found {self.top_p!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 0):
            raise ValueError(f"top_k must be a non-negative integer or None (0/None = off), found {self.top_k!r}")
        if not isinstance(self.repetition_penalty, (int, float)) or not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), found {self.repetition_penalty!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, found {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def penalize(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """The repetition penalty on float32 logits [b, vocab] where `seen` [b, vocab] (bool) is set."""
    if penalty == 1.0:
        return logits
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalised, logits)


def filter_logits(logits: jax.Array, config: SamplingConfig) -> jax.Array:
    """Temperature, then top-k, then top-p on float32 logits [b, vocab]; removed tokens get -inf."""
    logits = logits / jnp.float32(config.temperature)
    if config.top_k:
        k = min(config.top_k, logits.shape[-1])
        kth = jax.lax.top_k(logits, k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if config.top_p < 1.0:  # the kept set is every token at or above the last kept logit (sorted values only)
        sorted_logits = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        n_keep = jnp.maximum(jnp.sum(before < jnp.float32(config.top_p), axis=-1, keepdims=True), 1)
        cutoff = jnp.take_along_axis(sorted_logits, n_keep - 1, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def first_max_index(logits: jax.Array) -> jax.Array:
    """int32 [b]: argmax over the last axis (the first index of the largest value), as two plain reductions (a
    max, then the smallest index holding it), which XLA:CPU runs ~1.5x faster than argmax's paired reduction.
    A row with a NaN (no index equals its max) gives the last index, not an out-of-range one."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    index = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(logits == top, index, logits.shape[-1] - 1), axis=-1)


def row_keys(seed, rows: jax.Array, step: jax.Array) -> jax.Array:
    """One key per row: fold_in(fold_in(key(seed), row), step) (seed: an int or a traced int32)."""
    base = jax.random.key(seed)
    return jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(base, r), step))(rows)


def next_tokens(logits: jax.Array, seen: jax.Array, step, config: SamplingConfig, rows: jax.Array | None = None,
                seed=None):
    """The next token of each row (int32 [b]) from logits [b, vocab] (any float dtype; processed in float32).

    seen: bool [b, vocab], the tokens already in each row (for the repetition penalty); step: the
    decode step (a traced int is fine); rows: each row's id for its random stream (default 0..b-1);
    seed: overrides config.seed (a traced int32, so that a new seed needs no new compilation).
    """
    logits = penalize(logits.astype(jnp.float32), seen, config.repetition_penalty)
    if config.greedy:
        return first_max_index(logits)
    logits = filter_logits(logits, config)
    rows = jnp.arange(logits.shape[0], dtype=jnp.int32) if rows is None else rows
    keys = row_keys(config.seed if seed is None else seed, rows, step)
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)
