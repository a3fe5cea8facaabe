"""The preallocated key/value cache of a left-padded batch, and attention over it.

    k      [layers, batch, kv_heads, head_dim, max_len]   (2 x layers x kv_heads x head_dim x max_len x bytes
    v      [layers, batch, kv_heads, max_len, head_dim]    per row: nothing else grows with the length)
           stacked for a scanned model (its scan reads layer i's slice by a traced index), or tuples of
           `layers` arrays [batch, ...] for a loop model (`per_layer=True`): the decode attention's dots then
           read a layer's keys in place, where a slice of the stack is a copy (4 MB a step for the 4-layer
           benchmark model at batch 8: a quarter of its decode step)
    index  int32 scalar: slots [0, index) are written; the next chunk goes to [index, index + t)
    start  int32 [batch]: row b's first real slot (its left padding fills [0, start_b))

The layout is the decode dots' own: (batch, kv_heads) lead as their batch axes, and keys are stored
transposed, so both dots are plain [rows, d] x [d, max_len] and [rows, max_len] x [max_len, d] products
(XLA:CPU runs the decode attention 4x faster so than over [max_len, kv_heads, d] slots).

Rows are left-padded so every row writes the same slot at each step; row b's token in slot s sits at
rotary position s - start_b. A query in slot i of row b sees the key in slot j when

    start_b <= j <= i   and   i - j < window   (window: the layer's sliding_window, None = unbounded)

which is jlora.attention.masks.visible with the key segment 1 on [start_b, index + t) and 0 elsewhere.

The model calls `cache.at_layer(i).attend(q, k, v, segment_ids, ...)` inside layer i's attention (the
hook in jlora/models/attention.py; i is a Python int in a loop model, a traced int32 when the layers are
scanned: a scanned model carries the whole stacked cache through its scan and layer g * period + j updates
its slice in place, see jlora.models.stacked.ScannedLayers): it writes this chunk's k and v at
[index, index + t) and returns the attention output with the updated cache. A chunk of t > 1 is a prefill from slot 0 (index must be 0):
its attention is the model's own backend on the chunk (the left padding is segment 0), so the prompt
runs as in training. A chunk of t == 1 is a decode step: one masked softmax over all max_len slots
(scores [batch, kv_heads, group, max_len] in float32). After the model call the caller advances the
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
    layer: jax.Array  # int32 scalar: which layer's slice `attend` reads and writes (traced in a scan; a
    #                   Python int when k, v are per-layer tuples)

    @classmethod
    def create(cls, config, batch: int, max_len: int, start, *, dtype=jnp.float32,
               per_layer: bool = False) -> "KVCache":
        """An empty cache for `config` (a jlora ModelConfig): zeros, index 0, `start` [batch] (left padding);
        k, v one stacked array, or a tuple of per-layer arrays when `per_layer` (loop models)."""
        k_shape = (batch, config.num_key_value_heads, config.head_dim, max_len)
        v_shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        start = jnp.asarray(start, jnp.int32)
        if start.shape != (batch,):
            raise ValueError(f"KVCache.create: start must have shape ({batch},), found {start.shape}")
        zero, layers = jnp.zeros((), jnp.int32), config.num_hidden_layers
        if per_layer:
            k, v = (tuple(jnp.zeros(shape, dtype) for _ in range(layers)) for shape in (k_shape, v_shape))
            return cls(k, v, zero, start, 0)
        return cls(jnp.zeros((layers,) + k_shape, dtype), jnp.zeros((layers,) + v_shape, dtype), zero, start, zero)

    @property
    def per_layer(self) -> bool:
        return isinstance(self.k, tuple)

    @property
    def max_len(self) -> int:
        return self.v[0].shape[2] if self.per_layer else self.v.shape[3]

    @property
    def nbytes(self) -> int:
        """Bytes of k and v: 2 x layers x batch x max_len x kv_heads x head_dim x itemsize."""
        return sum(x.nbytes for x in jax.tree.leaves((self.k, self.v)))

    def at_layer(self, layer) -> "KVCache":
        """This cache addressed at `layer` (a Python int, or a traced int32 inside a scan over layers; per-layer
        arrays need the int)."""
        if self.per_layer:
            if isinstance(layer, jax.core.Tracer):
                raise ValueError("KVCache.at_layer: a per-layer cache needs a Python int layer (a scanned model "
                                 "needs the stacked cache: KVCache.create(..., per_layer=False))")
            return dataclasses.replace(self, layer=int(layer))
        return dataclasses.replace(self, layer=jnp.asarray(layer, jnp.int32))

    def layer_kv(self) -> tuple[jax.Array, jax.Array]:
        """This layer's keys [batch, kv_heads, head_dim, max_len] and values [batch, kv_heads, max_len, head_dim]."""
        if self.per_layer:
            return self.k[self.layer], self.v[self.layer]
        return (jax.lax.dynamic_index_in_dim(self.k, self.layer, keepdims=False),
                jax.lax.dynamic_index_in_dim(self.v, self.layer, keepdims=False))

    def advanced(self, t: int) -> "KVCache":
        """The cache after every layer wrote a chunk of t tokens."""
        return dataclasses.replace(self, index=self.index + t, layer=0 if self.per_layer else jnp.zeros((), jnp.int32))

    def positions(self, t: int) -> jax.Array:
        """Rotary positions [batch, t] of the next chunk of t tokens (0 at each row's first real slot)."""
        slots = self.index + jnp.arange(t, dtype=jnp.int32)
        return jnp.maximum(slots[None, :] - self.start[:, None], 0)

    def write(self, k: jax.Array, v: jax.Array) -> "KVCache":
        """This layer's k, v [batch, t, kv_heads, head_dim] written at slots [index, index + t)."""
        k, v = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)  # [b, kv_heads, d, t], [b, kv_heads, t, d]
        k_at, v_at = (0, 0, 0, self.index), (0, 0, self.index, 0)
        if self.per_layer:
            i = self.layer

            def put(arrays, new, at):
                new = jax.lax.dynamic_update_slice(arrays[i], new.astype(arrays[i].dtype), at)
                return arrays[:i] + (new,) + arrays[i + 1:]
            return dataclasses.replace(self, k=put(self.k, k, k_at), v=put(self.v, v, v_at))

        def put_stacked(stack, new, at):
            return jax.lax.dynamic_update_slice(stack, new[None].astype(stack.dtype), (self.layer,) + at)
        return dataclasses.replace(self, k=put_stacked(self.k, k, k_at), v=put_stacked(self.v, v, v_at))

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
        keys, values = self.layer_kv()
        q_idx = self.index + jnp.arange(t, dtype=jnp.int32)
        mask = visible(q_idx, jnp.arange(self.max_len, dtype=jnp.int32), jnp.ones((b, t), jnp.int32),
                       self.valid(t), sliding_window)[:, None, :, None]        # [b, 1, t, 1, max_len]
        k_heads, group, d = q.shape[2:]
        # (t, group) folded into one row axis: with t == 1 a bitcast, and the dots see [b, kv_heads] batches of
        # [rows, d] x [d, max_len] (a unit axis between the batch and row axes made XLA:CPU's dots 2.4x slower)
        rows = jnp.swapaxes(q, 1, 2).reshape(b, k_heads, t * group, d)
        scores = jnp.einsum("bkrd,bkds->bkrs", rows, keys.astype(q.dtype), preferred_element_type=jnp.float32)
        scores = softcap(scores * jnp.float32(scale), logit_softcap).reshape(b, k_heads, t, group, -1)
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype).reshape(b, k_heads, t * group, -1)
        out = jnp.einsum("bkrs,bksd->bkrd", probs, values.astype(q.dtype))
        return jnp.swapaxes(out.reshape(b, k_heads, t, group, d), 1, 2)


jax.tree_util.register_dataclass(KVCache, data_fields=["k", "v", "index", "start", "layer"], meta_fields=[])
