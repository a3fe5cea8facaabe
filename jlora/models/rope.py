"""Rotary position embeddings as transformers computes them (default, linear, llama3), one table per kind.

inv_freq_j = 1 / theta^(2j / d) for j < d/2, then
- linear:  inv_freq / factor
- llama3:  wavelengths 2*pi/inv_freq above original_ctx/low_freq_factor are divided by factor, those below
           original_ctx/high_freq_factor kept, and the band between interpolated smoothly.
rotate(x, p) = x * cos(p * inv_freq) + rotate_half(x) * sin(p * inv_freq), halves not interleaved.
Backward (rotate is linear in x): dx = dy * cos + rotate_half^T(dy * sin), rotate_half^T(z) = [z_2, -z_1]
for halves z_1, z_2: the same products and sums autodiff forms, in the same dtype, so the same numbers.
Written out for its form: autodiff transposes the forward's concatenate into two zero-pads summed, and
XLA:CPU fused those pads with the transpose of the attention's head-major gradient into one loop at 7-8 ns
per element; a concatenate of the two halves fuses at 1-3 ns (135m bf16 step: -4%, benchmarks/RESULTS.md).

Tables by LayerSpec.rope: "global" uses rope_theta + rope_scaling; "local" (Gemma 3's sliding layers) uses
rope_local_theta + rope_local_scaling (None: unscaled); "none" layers are not rotated.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jlora.attention.backends import platform
from jlora.models.config import ModelConfig
from jlora.models.family import ROPE_GLOBAL, ROPE_LOCAL


def inverse_frequencies(config: ModelConfig, kind: str = ROPE_GLOBAL) -> np.ndarray:
    """float32 [head_dim // 2] of the `kind` table ("global" | "local"), computed in float32 like transformers."""
    if kind == ROPE_LOCAL:
        theta, scaling = config.rope_local_theta, config.rope_local_scaling
        scaling = dict(scaling) if scaling else None
    elif kind == ROPE_GLOBAL:
        theta, scaling = config.rope_theta, config.rope_scaling_dict
    else:
        raise ValueError(f"rope table {kind!r} is not one of {ROPE_GLOBAL!r}, {ROPE_LOCAL!r}")
    return _inverse_frequencies(config.rotary_dim, theta, scaling, config.max_position_embeddings)


def _inverse_frequencies(dim: int, theta: float, scaling: dict | None, max_positions: int) -> np.ndarray:
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)
    if scaling is None:
        return inv_freq
    kind = scaling["rope_type"]
    factor = np.float32(scaling["factor"])
    if kind == "linear":
        return (inv_freq / factor).astype(np.float32)
    if kind != "llama3":
        raise ValueError(f"rope_type {kind!r} has no table here (jlora.models.hf_fields.ROPE_TYPES)")
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling.get("original_max_position_embeddings", max_positions)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = (np.float32(2 * math.pi) / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = ((old_ctx / wavelen - low) / (high - low)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def longrope_frequencies(dim: int, theta: float, scaling: dict) -> tuple[np.ndarray, np.ndarray]:
    """(short, long) float32 [dim // 2]: 1 / (factor_j * theta^(2j / dim)) with the short / long factors,
    computed in float32 like transformers' `_compute_longrope_parameters`."""
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    base = (np.float32(theta) ** exponent).astype(np.float32)
    return tuple((np.float32(1.0) / (np.asarray(scaling[k], np.float32) * base)).astype(np.float32)
                 for k in ("short_factor", "long_factor"))


def longrope_cos_sin(positions: jnp.ndarray, config: ModelConfig) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Phi-3's longrope table: the long factors when max(positions) + 1 > original_max_position_embeddings
    (one choice for the whole batch, as transformers makes it), else the short ones; cos and sin times
    attention_factor (in float32)."""
    scaling = config.rope_scaling_dict
    short, long_ = longrope_frequencies(config.rotary_dim, config.rope_theta, scaling)
    use_long = jnp.max(positions) + 1 > scaling["original_max_position_embeddings"]
    cos, sin = cos_sin(positions, jnp.where(use_long, long_, short))
    factor = jnp.float32(scaling["attention_factor"])
    return cos * factor, sin * factor


def cos_sin(positions: jnp.ndarray, inv_freq: np.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin float32 [batch, seq, head_dim] for integer positions [batch, seq]."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def rope_tables(config: ModelConfig, positions: jnp.ndarray) -> dict[str, tuple[jnp.ndarray, jnp.ndarray]]:
    """kind -> (cos, sin) for every table some layer uses; "global" always (no-rope layers are handed it
    and ignore it, so every layer is called the same way)."""
    kinds = dict.fromkeys((ROPE_GLOBAL, *config.rope_kinds))
    longrope = (config.rope_scaling_dict or {}).get("rope_type") == "longrope"
    tables = {k: longrope_cos_sin(positions, config) if longrope and k == ROPE_GLOBAL
              else cos_sin(positions, inverse_frequencies(config, k)) for k in kinds}
    return jax.tree.map(_materialized, tables)


def _materialized(table):
    """On CPU, table @ I: the same numbers (each output is one product with 1.0 plus exact zeros), computed once.

    XLA:CPU fuses an elementwise producer into every consumer and evaluates it there; with the float32 tables
    that meant cos and sin re-evaluated per element (and per head) inside every layer's rope forward and
    backward (toy f32 step: fusions at 11-15 ns per element, ~7% of the step; benchmarks/RESULTS.md). A dot
    is never fused into its consumers, and an optimization barrier does not survive to XLA's fusion pass.
    """
    if platform() != "cpu":
        return table
    return jnp.dot(table, jnp.eye(table.shape[-1], dtype=table.dtype), precision="highest")


def apply_rotary(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """x [batch, seq, heads, head_dim]; cos/sin [batch, seq, rotary_dim] cast to x's dtype first. With
    rotary_dim < head_dim (partial_rotary_factor) the first rotary_dim dims rotate and the rest pass through."""
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:
        return jnp.concatenate([apply_rotary(x[..., :rotary], cos, sin), x[..., rotary:]], axis=-1)
    return _rotate(x, cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype))


def _rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _rotate_half_transposed(z):
    half = z.shape[-1] // 2
    return jnp.concatenate([z[..., half:], -z[..., :half]], axis=-1)


@jax.custom_vjp
def _rotate(x, cos, sin):
    """x * cos + rotate_half(x) * sin, everything in x's dtype; cos and sin get no gradient (positions)."""
    return x * cos + _rotate_half(x) * sin


def _rotate_fwd(x, cos, sin):
    return _rotate(x, cos, sin), (cos, sin)


def _rotate_bwd(residuals, dy):
    cos, sin = residuals
    return dy * cos + _rotate_half_transposed(dy * sin), None, None


_rotate.defvjp(_rotate_fwd, _rotate_bwd)
