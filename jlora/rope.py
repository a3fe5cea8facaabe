"""Rotary position embeddings as transformers computes them (default, linear, llama3).

inv_freq_j = 1 / theta^(2j / d) for j < d/2, then
- linear:  inv_freq / factor
- llama3:  wavelengths 2*pi/inv_freq above original_ctx/low_freq_factor are divided by factor, those below
           original_ctx/high_freq_factor kept, and the band between interpolated smoothly.
rotate(x, p) = x * cos(p * inv_freq) + rotate_half(x) * sin(p * inv_freq), halves not interleaved.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jlora.llama_config import LlamaConfig


def inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """float32 [head_dim // 2], computed in float32 like transformers."""
    dim = config.head_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / (np.float32(config.rope_theta) ** exponent)).astype(np.float32)
    scaling = config.rope_scaling_dict
    if scaling is None:
        return inv_freq
    kind = scaling["rope_type"]
    factor = np.float32(scaling["factor"])
    if kind == "linear":
        return (inv_freq / factor).astype(np.float32)
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling.get("original_max_position_embeddings", config.max_position_embeddings)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = (np.float32(2 * math.pi) / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = ((old_ctx / wavelen - low) / (high - low)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def cos_sin(positions: jnp.ndarray, inv_freq: np.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin float32 [batch, seq, head_dim] for integer positions [batch, seq]."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """x [batch, seq, heads, head_dim]; cos/sin [batch, seq, head_dim] cast to x's dtype first."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin
