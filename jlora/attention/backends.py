"""One attention setting for the model: which implementation computes softmax(q k^T * scale + mask) v.

    "reference"  every score at once (jlora.attention.reference): O(T^2) memory, the tested truth
    "blockwise"  plain-JAX online softmax over blocks with its own backward (jlora.attention.blockwise):
                 O(T) memory, runs everywhere
    "auto"       the best available here: "reference" when one block covers the row (the blockwise path
                 would hold the same [T, T] block, and it was no faster at T 64 to 256 on CPU), else
                 "blockwise" (on CPU 1.35x the reference's speed at T 512 and 2 to 3x at T 2048, with a
                 third of the temporaries: benchmarks/long_context.py). TPU splash
                 and GPU cuDNN backends come later and will be chosen here where they run.

Every backend computes the same function (causal, packed segments, sliding window, grouped kv heads).
A name that is not available on this platform is an error naming the ones that are.
"""
from __future__ import annotations

import jax.numpy as jnp

from jlora.attention.blockwise import BlockSizes, blockwise_attention
from jlora.attention.reference import reference_attention

BACKENDS = ("auto", "blockwise", "reference")
DEFAULT_BACKEND = "auto"
_PLANNED = ("splash", "cudnn", "flash")  # named in issue 11; not implemented yet


def check_backend(name: str) -> str:
    """`name` if it is a backend available here, else a ValueError naming those that are."""
    if name in BACKENDS:
        return name
    why = "is not implemented yet" if name in _PLANNED else "is unknown"
    raise ValueError(f"attention backend {name!r} {why}; available here: {', '.join(BACKENDS)}")


def resolve(name: str, seq_len: int, block_sizes: BlockSizes | None = None) -> str:
    """The concrete backend `name` runs as for rows of `seq_len` ("auto" -> the best available)."""
    if check_backend(name) != "auto":
        return name
    blocks = block_sizes or BlockSizes.get_default()
    return "reference" if seq_len <= min(blocks.q, blocks.k) else "blockwise"


def attend(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, segment_ids: jnp.ndarray, *, backend: str = DEFAULT_BACKEND,
           sliding_window: int | None = None, scale: float, block_sizes: BlockSizes | None = None,
           logit_softcap: float | None = None) -> jnp.ndarray:
    """q [b, t, kv_heads, group, d], k and v [b, t, kv_heads, d], segment_ids [b, t] -> [b, t, kv_heads, group, d].

    `logit_softcap` (Gemma 2's attn_logit_softcapping): scores s = q k^T * scale become cap * tanh(s / cap)
    before the mask and the softmax; None leaves them as they are."""
    if resolve(backend, q.shape[1], block_sizes) == "reference":
        return reference_attention(q, k, v, segment_ids, sliding_window=sliding_window, scale=scale,
                                   logit_softcap=logit_softcap)
    return blockwise_attention(q, k, v, segment_ids, sliding_window=sliding_window, scale=scale,
                               block_sizes=block_sizes, logit_softcap=logit_softcap)


def use_attention(model, backend: str = DEFAULT_BACKEND, *, block_sizes: BlockSizes | None = None):
    """Sets the attention backend (and blockwise block sizes) of every attention module in `model`: the
    modules that carry an `attention` setting (jlora.llama.Attention). Returns the model."""
    from flax import nnx

    check_backend(backend)
    found = 0
    for _, module in nnx.iter_graph(model):
        if isinstance(module, nnx.Module) and hasattr(module, "attention_blocks"):
            module.attention, module.attention_blocks = backend, block_sizes
            found += 1
    if not found:
        raise ValueError(f"use_attention: {type(model).__name__} has no attention modules (jlora.llama.Attention)")
    return model
