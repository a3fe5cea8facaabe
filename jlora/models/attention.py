"""Grouped-query attention: q, k, v projections, optional per-head q/k norms, rotary, a backend, o_proj.

    q = q_norm(x Wq) , k = k_norm(x Wk)     per head, over head_dim (config.qk_norm: Qwen3, Gemma3)
    q, k = rope(q), rope(k)                 the layer's table (LayerSpec.rope; "none": not rotated)
    out = softmax(softcap(q k^T * scale) + mask) v,   scale = config.attention_scale
    mask: causal, same segment, and within the layer's window (LayerSpec.sliding_window)

The backend (`attention`, set by jlora.attention.use_attention) is "auto" | "blockwise" | "reference"
(jlora.attention.backends); it computes the masked softmax, this module everything around it.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jlora.attention import DEFAULT_BACKEND as DEFAULT_ATTENTION
from jlora.attention import attend
from jlora.models.config import ModelConfig
from jlora.models.family import ROPE_NONE, LayerSpec
from jlora.models.fused import split_qkv
from jlora.models.layers import Linear, RMSNorm
from jlora.models.rope import apply_rotary
from jlora.remat import projection_output

Dtype = jnp.dtype


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, spec: LayerSpec | None = None, *, dtype: Dtype, param_dtype: Dtype,
                 rngs: nnx.Rngs):
        c = config
        spec = spec if spec is not None else LayerSpec(c.sliding_window)
        kw = dict(dtype=dtype, param_dtype=param_dtype, init_std=c.initializer_range, rngs=rngs)
        self.fused = c.fused_projections
        if self.fused:  # Phi-3: one projection, output q | k | v (jlora.models.fused)
            self.qkv_proj = Linear(c.hidden_size, c.q_features + 2 * c.kv_features, use_bias=c.qkv_bias, **kw)
        else:
            self.q_proj = Linear(c.hidden_size, c.q_features, use_bias=c.qkv_bias, **kw)
            self.k_proj = Linear(c.hidden_size, c.kv_features, use_bias=c.qkv_bias, **kw)
            self.v_proj = Linear(c.hidden_size, c.kv_features, use_bias=c.qkv_bias, **kw)
        self.o_proj = Linear(c.q_features, c.hidden_size, use_bias=c.o_bias, **kw)
        if c.qk_norm:
            norm = dict(eps=c.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, offset=c.norm_weight_offset)
            self.q_norm = RMSNorm(c.head_dim, **norm)
            self.k_norm = RMSNorm(c.head_dim, **norm)
        else:
            self.q_norm = self.k_norm = nnx.data(None)
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.sliding_window = spec.sliding_window
        self.rope = spec.rope
        self.scale = c.attention_scale
        self.logit_softcap = c.attn_logit_softcapping
        self.dtype = dtype
        self.attention = DEFAULT_ATTENTION
        self.attention_blocks = None  # jlora.attention.BlockSizes, None: its default

    def __call__(self, x, cos, sin, segment_ids, cache=None):
        """With `cache` (jlora.generate.cache.KVCache at this layer): writes k, v into it and returns (out, cache)."""
        b, t, _ = x.shape
        if self.fused:
            qkv = projection_output(self.qkv_proj(x))
            q, k, v = split_qkv(qkv, self.heads * self.head_dim, self.kv_heads * self.head_dim)
        else:
            q, k, v = (projection_output(p(x)) for p in (self.q_proj, self.k_proj, self.v_proj))
        q = q.reshape(b, t, self.heads, self.head_dim)
        k = k.reshape(b, t, self.kv_heads, self.head_dim)
        v = v.reshape(b, t, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope != ROPE_NONE:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        group = self.heads // self.kv_heads
        q = q.reshape(b, t, self.kv_heads, group, self.head_dim)
        # logit_softcap only when set: attend() grows that keyword with the soft-capping backends.
        cap = {} if self.logit_softcap is None else {"logit_softcap": self.logit_softcap}
        if cache is not None:
            out, cache = cache.attend(q, k, v, segment_ids, backend=self.attention, sliding_window=self.sliding_window,
                                      scale=self.scale, block_sizes=self.attention_blocks, **cap)
            return self.o_proj(out.reshape(b, t, self.heads * self.head_dim)), cache
        out = attend(q, k, v, segment_ids, backend=self.attention, sliding_window=self.sliding_window,
                     scale=self.scale, block_sizes=self.attention_blocks, **cap)
        return projection_output(self.o_proj(out.reshape(b, t, self.heads * self.head_dim)))
