"""cuDNN flash attention (jax.nn.dot_product_attention(implementation="cudnn")) behind jlora's contract.

What jax 0.10.2's public call can express, and what happens to the rest:
    causal             is_causal=True
    sliding window     local_window_size=(window - 1, 0): keys q - window < k <= q
    grouped kv heads   key/value [b, t, kv_heads, d], query [b, t, kv_heads * group, d] (GQA: query head
                       h reads kv head h // group, jlora's [kv_heads, group] order flattened)
    packed segments    NOT expressible without a [T, T] mask (the call takes no segment ids): a row whose
                       segment ids are not all equal (packing, or padding with id 0) is computed by the
                       fallback backend instead, chosen per batch at run time by a lax.cond
    soft cap, float32, head_dim not a multiple of 8 or above cuDNN's limit (128; 256 on Hopper):
                       not expressible at all: the whole call runs the fallback

The fallback is "flash" (jlora.attention.flash, Pallas GPU kernels) on a GPU, "blockwise" elsewhere (the
CPU tests of these paths).

Every fallback is announced once per reason (warnings.warn); none computes another function.
"""
from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp

from jlora.attention.blockwise import blockwise_attention
from jlora.attention.masks import check_inputs

_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


@functools.cache
def _warn_once(reason: str, fallback: str = "blockwise") -> None:
    warnings.warn(f"attention backend 'cudnn': {reason}; computed by the {fallback!r} backend instead", stacklevel=4)


def _fallback(sliding_window, scale, logit_softcap, block_sizes):
    """(name, function) of the backend that computes what cuDNN cannot: "flash" on a GPU, else "blockwise"."""
    kw = dict(sliding_window=sliding_window, scale=scale, logit_softcap=logit_softcap)
    if jax.default_backend() == "gpu":
        from jlora.attention.flash import flash_attention  # pylint: disable=import-outside-toplevel
        return "flash", functools.partial(flash_attention, **kw)
    return "blockwise", functools.partial(blockwise_attention, block_sizes=block_sizes, **kw)


def _head_dim_limit() -> int:
    """cuDNN's largest flash-attention head_dim on this GPU: 256 from compute capability 9.0 (Hopper), else 128."""
    try:
        capability = float(jax.devices()[0].compute_capability)
    except (AttributeError, ValueError, RuntimeError):
        return 128
    return 256 if capability >= 9.0 else 128


def static_fallback_reason(dtype, head_dim: int, logit_softcap: float | None) -> str | None:
    """Why cuDNN cannot compute this call at all (None: it can, for rows with one segment)."""
    if logit_softcap is not None:
        return "a logit soft cap is not expressible in jax.nn.dot_product_attention"
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in _CUDNN_DTYPES]:
        return f"cuDNN flash attention takes bfloat16 or float16, got {jnp.dtype(dtype).name}"
    limit = _head_dim_limit()
    if head_dim % 8 or head_dim > limit:
        return f"cuDNN flash attention needs head_dim a multiple of 8 and <= {limit}, got {head_dim}"
    return None


def cudnn_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, segment_ids: jnp.ndarray, *,
                    sliding_window: int | None = None, scale: float, logit_softcap: float | None = None,
                    block_sizes=None) -> jnp.ndarray:
    """q [b, t, kv_heads, group, d], k and v [b, t, kv_heads, d], segment_ids [b, t] -> [b, t, kv_heads, group, d].

    `block_sizes` are the blockwise fallback's (module docstring); flash uses its own."""
    b, t, kv, g, d = q.shape
    check_inputs("cudnn_attention", q, k, v, segment_ids, sliding_window=sliding_window,
                 logit_softcap=logit_softcap)
    name, fallback = _fallback(sliding_window, scale, logit_softcap, block_sizes)
    reason = static_fallback_reason(q.dtype, d, logit_softcap)
    if reason is not None:
        _warn_once(reason, name)
        return fallback(q, k, v, segment_ids)

    def fused(q, k, v, segment_ids):
        window = None if sliding_window is None else (sliding_window - 1, 0)
        out = jax.nn.dot_product_attention(q.reshape(b, t, kv * g, d), k, v, scale=scale, is_causal=True,
                                           local_window_size=window, implementation="cudnn")
        return out.reshape(b, t, kv, g, d)

    _warn_once("rows whose segment ids are not all equal (packing, padding) are not expressible without a "
               "[T, T] mask (jax.nn.dot_product_attention takes no segment ids); such batches", name)
    one_segment = jnp.all(segment_ids == segment_ids[:, :1])
    return jax.lax.cond(one_segment, fused, fallback, q, k, v, segment_ids)
