"""The preallocated key/value cache of a left-padded batch, and attention over it.

    k, v   [layers, batch, max_len, kv_heads, head_dim]   (2 x layers x kv_heads x head_dim x max_len x bytes
                                                            per row: nothing else grows with the length)
    index  int32 scalar: slots [0, index) are written; the next chunk goes to [index, index + t)
    start  int32 [batch]: row b's first real slot (its left padding fills [0, start_b))

Rows are left-padded so every row writes the same slot at each step; row b's token in slot s sits at
rotary position s - start_b. A query in slot i of row b sees the key in slot j when

    start_b <= j <= i   and   i - j < window   (window: the layer's sliding_window, None = unbounded)

which is jlora.attention.masks.visible with the key segment 1 on [start_b, index + t) and 0 elsewhere.

The model calls `cache.at_layer(i).attend(q, k, v, segment_ids, ...)` inside layer i's attention (the
hook in jlora/models/attention.py; i is an int32 array, traced when the layers are scanned: a scanned
model carries the whole stacked cache through its scan and layer g * period + j updates its slice in
place, see jlora.models.stacked.ScannedLayers): it writes this chunk's k and v at [index, index + t) and returns the
attention output with the updated cache. A chunk of t > 1 is a prefill from slot 0 (index must be 0):
its attention is the model's own backend on the chunk (the left padding is segment 0), so the prompt
runs as in training. A chunk of t == 1 is a decode step: one masked softmax over all max_len slots
(scores [batch, kv_heads, group, 1, max_len] in float32). After the model call the caller advances the
index by t (`advanced`): the layers all write the same slots.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jlora.attention import attend as attend_backend
from jlora.attention.masks import softcap, visible


@dataclasses.dataclass(frozen=True)
class KVCache:
    k: jax.Array
    v: jax.Array
    index: jax.Array
    start: jax.Array
    layer: jax.Array  # int32 scalar: which layer's slice `attend` reads and writes (traced in a scan)

    @classmethod
    def create(cls, config, batch: int, max_len: int, start, *, dtype=jnp.float32) -> "KVCache":
        """An empty cache for `config` (a jlora ModelConfig): zeros, index 0, `start` [batch] (left padding)."""
        shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.head_dim)
        start = jnp.asarray(start, jnp.int32)
        if start.shape != (batch,):
            raise ValueError(f"KVCache.create: start must have shape ({batch},), found {start.shape}")
        zero = jnp.zeros((), jnp.int32)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), zero, start, zero)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes of k and v: 2 x layers x batch x max_len x kv_heads x head_dim x itemsize."""
        return self.k.nbytes + self.v.nbytes

    def at_layer(self, layer) -> "KVCache":
        """This cache addressed at `layer` (a Python int, or a traced int32 inside a scan over layers)."""
        return dataclasses.replace(self, layer=jnp.asarray(layer, jnp.int32))

    def advanced(self, t: int) -> "KVCache":
        """The cache after every layer wrote a chunk of t tokens."""
        return dataclasses.replace(self, index=self.index + t, layer=jnp.zeros((), jnp.int32))

    def positions(self, t: int) -> jax.Array:
        """Rotary positions [batch, t] of the next chunk of t tokens (0 at each row's first real slot)."""
        slots = self.index + jnp.arange(t, dtype=jnp.int32)
        return jnp.maximum(slots[None, :] - self.start[:, None], 0)

    def write(self, k: jax.Array, v: jax.Array) -> "KVCache":
        """This layer's k, v [batch, t, kv_heads, head_dim] written at slots [index, index + t)."""
        at = (self.layer, 0, self.index, 0, 0)
        return dataclasses.replace(self, k=jax.lax.dynamic_update_slice(self.k, k[None].astype(self.k.dtype), at),
                                   v=jax.lax.dynamic_update_slice(self.v, v[None].astype(self.v.dtype), at))

    def attend(self, q, k, v, segment_ids, *, sliding_window: int | None, scale: float,
               logit_softcap: float | None = None, backend: str = "auto", block_sizes=None):
        """q [b, t, kv_heads, group, d], k and v [b, t, kv_heads, d] of this layer -> (out like q, cache)."""
        cache = self.write(k, v)
        if q.shape[1] > 1:  # prefill from slot 0: the model's backend on the chunk itself
            cap = {} if logit_softcap is None else {"logit_softcap": logit_softcap}
            out = attend_backend(q, k, v, segment_ids, backend=backend, sliding_window=sliding_window, scale=scale,
                                 block_sizes=block_sizes, **cap)
            return out, cache
        return cache.attend_cached(q, sliding_window=sliding_window, scale=scale, logit_softcap=logit_softcap), cache

    def valid(self, t: int) -> jax.Array:
        """int32 [batch, max_len]: 1 on the slots a chunk of t tokens at `index` may see (before causality)."""
        slots = jnp.arange(self.max_len, dtype=jnp.int32)
        return ((slots[None, :] >= self.start[:, None]) & (slots[None, :] < self.index + t)).astype(jnp.int32)

    def attend_cached(self, q, *, sliding_window: int | None, scale: float, logit_softcap: float | None = None):
        """softmax(softcap(q K^T * scale) + mask) V over this layer's cached slots (q [b, t, kv_heads, group, d])."""
        b, t = q.shape[:2]
        keys = jax.lax.dynamic_index_in_dim(self.k, self.layer, keepdims=False)
        values = jax.lax.dynamic_index_in_dim(self.v, self.layer, keepdims=False)
        q_idx = self.index + jnp.arange(t, dtype=jnp.int32)
        mask = visible(q_idx, jnp.arange(self.max_len, dtype=jnp.int32), jnp.ones((b, t), jnp.int32),
                       self.valid(t), sliding_window)[:, None, None]           # [b, 1, 1, t, max_len]
        scores = jnp.einsum("btkgd,bskd->bkgts", q, keys.astype(q.dtype), preferred_element_type=jnp.float32)
        scores = softcap(scores * jnp.float32(scale), logit_softcap)
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        return jnp.einsum("bkgts,bskd->btkgd", probs, values.astype(q.dtype))


jax.tree_util.register_dataclass(KVCache, data_fields=["k", "v", "index", "start", "layer"], meta_fields=[])
