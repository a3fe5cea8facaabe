"""One attention setting for the model: which implementation computes softmax(softcap(q k^T * scale) + mask) v.

    "reference"  every score at once (jlora.attention.reference): O(T^2) memory, the tested truth
    "blockwise"  plain-JAX online softmax over blocks with its own backward (jlora.attention.blockwise):
                 O(T) memory, runs everywhere
    "splash"     TPU Pallas splash attention (jlora.attention.splash): the Mosaic kernel on TPU, and when
                 a step traced on a CPU host is compiled for a TPU topology (jlora plan); on CPU it runs
                 the same kernel in Pallas interpret mode (slow: for tests). Blocks are multiples of 128
                 (default 512, capped at the row); the row is padded to a multiple of the blocks.
    "cudnn"      cuDNN flash attention through jax.nn.dot_product_attention (jlora.attention.cudnn), CUDA
                 GPUs only: causal, window and grouped heads in bf16/fp16; batches with packed or padded
                 rows, a soft cap, float32 or an unsupported head_dim run "flash" (warned once each)
    "auto"       the best available here: "splash" on TPU; "cudnn" on a GPU where the call can express
                 the mask (bf16/fp16, no soft cap, head_dim it takes; its packed batches run "flash"),
                 else "flash"; elsewhere
                 "reference" when one block covers the row (the blockwise path would hold the same
                 [T, T] block, and it was no faster at T 64 to 256 on CPU), else "blockwise" (on CPU
                 1.35x the reference's speed at T 512 and 2 to 3x at T 2048, with a third of the
                 temporaries: benchmarks/long_context.py)
    "flash"      Pallas GPU flash attention (jlora.attention.flash): jlora's own Triton-lowered kernels for
                 what cuDNN's call cannot express (packed segments, soft cap, float32, any head_dim), with
                 windows and grouped heads; on CPU the same kernels in Pallas interpret mode (slow: for tests)

Every backend computes the same function: causal, packed segments (a query sees keys of its own segment
id), a sliding window (keys q - window < k <= q), grouped kv heads, and Gemma 2's logit soft cap
(s -> cap * tanh(s / cap) after scaling, before the mask). A name not available on this platform is a
ValueError naming the ones that are; a mask a backend cannot express falls back to blockwise and says
so once (warnings.warn), never computes something else.

Selecting one: `use_attention(model, "splash")` (block sizes: `block_sizes=jlora.attention.BlockSizes(q, k)`
or splash's own BlockSizes), or `attend(..., backend="splash")` directly.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jlora.attention.blockwise import BlockSizes, blockwise_attention
from jlora.attention.reference import reference_attention

BACKENDS = ("auto", "blockwise", "reference", "splash", "cudnn", "flash")
DEFAULT_BACKEND = "auto"
_PLANNED = ("xla",)  # named in issue 11; not implemented (use "blockwise" or "reference")


def platform() -> str:
    """This process's default JAX platform: "cpu" | "gpu" | "tpu" (jax.default_backend())."""
    return jax.default_backend()


def available_backends(on: str | None = None) -> tuple[str, ...]:
    """The backend names that run on platform `on` (default: this process's)."""
    on = on or platform()
    extra = {"tpu": ("splash",), "cpu": ("splash", "flash"), "gpu": ("cudnn", "flash")}.get(on, ())
    return ("auto", "blockwise", "reference") + extra


def check_backend(name: str, on: str | None = None) -> str:
    """`name` if it is a backend available on platform `on` (default: here), else a ValueError naming those that are."""
    available = available_backends(on)
    if name in available:
        return name
    on = on or platform()
    if name in BACKENDS:
        why = {"splash": "needs a TPU (or a CPU: Pallas interpret mode)", "cudnn": "needs a CUDA GPU",
               "flash": "needs a CUDA GPU (or a CPU: Pallas interpret mode)"}[name]
        why = f"is not available on {on} ({why})"
    else:
        why = "is not implemented yet" if name in _PLANNED else "is unknown"
    raise ValueError(f"attention backend {name!r} {why}; available here: {', '.join(available)}")


def resolve(name: str, seq_len: int, block_sizes=None, *, dtype=jnp.float32, head_dim: int = 128,
            logit_softcap: float | None = None, on: str | None = None) -> str:
    """The concrete backend `name` runs as for rows of `seq_len` ("auto" -> the best available on `on`)."""
    if check_backend(name, on) != "auto":
        return name
    on = on or platform()
    if on == "tpu":
        return "splash"
    if on == "gpu":
        from jlora.attention.cudnn import static_fallback_reason  # pylint: disable=import-outside-toplevel
        return "cudnn" if static_fallback_reason(dtype, head_dim, logit_softcap) is None else "flash"
    blocks = block_sizes if isinstance(block_sizes, BlockSizes) else BlockSizes.get_default()
    return "reference" if seq_len <= min(blocks.q, blocks.k) else "blockwise"


def attend(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, segment_ids: jnp.ndarray, *, backend: str = DEFAULT_BACKEND,
           sliding_window: int | None = None, scale: float, block_sizes=None,
           logit_softcap: float | None = None) -> jnp.ndarray:
    """q [b, t, kv_heads, group, d], k and v [b, t, kv_heads, d], segment_ids [b, t] -> [b, t, kv_heads, group, d].

    `logit_softcap` (Gemma 2's attn_logit_softcapping): scores s = q k^T * scale become cap * tanh(s / cap)
    before the mask and the softmax; None leaves them as they are. `block_sizes`: jlora.attention.BlockSizes
    (blockwise; splash takes them too when they are multiples of 128), splash's own BlockSizes, or None."""
    kw = dict(sliding_window=sliding_window, scale=scale, logit_softcap=logit_softcap)
    name = resolve(backend, q.shape[1], block_sizes, dtype=q.dtype, head_dim=q.shape[-1], logit_softcap=logit_softcap)
    if name == "reference":
        return reference_attention(q, k, v, segment_ids, **kw)
    if name == "splash":
        from jlora.attention.splash import LANES, splash_attention  # pylint: disable=import-outside-toplevel
        blockwise_only = isinstance(block_sizes, BlockSizes) and (block_sizes.q % LANES or block_sizes.k % LANES)
        if backend == "auto" and blockwise_only:
            block_sizes = None  # blockwise's blocks, which splash cannot take: auto uses splash's own
        return splash_attention(q, k, v, segment_ids, block_sizes=block_sizes, **kw)
    blockwise_blocks = block_sizes if isinstance(block_sizes, BlockSizes) else None
    if name == "flash":
        from jlora.attention.flash import flash_attention  # pylint: disable=import-outside-toplevel
        flash_blocks = blockwise_blocks if backend == "flash" else None  # auto: flash's own (powers of two)
        return flash_attention(q, k, v, segment_ids, block_sizes=flash_blocks, **kw)
    if name == "cudnn":
        from jlora.attention.cudnn import cudnn_attention  # pylint: disable=import-outside-toplevel
        return cudnn_attention(q, k, v, segment_ids, block_sizes=blockwise_blocks, **kw)
    return blockwise_attention(q, k, v, segment_ids, block_sizes=blockwise_blocks, **kw)


def use_attention(model, backend: str = DEFAULT_BACKEND, *, block_sizes=None):
    """Sets the attention backend (and block sizes) of every attention module in `model`: the modules that
    carry an `attention` setting (jlora.models.attention.Attention). Returns the model."""
    from flax import nnx

    check_backend(backend)
    found = 0
    for _, module in nnx.iter_graph(model):
        if isinstance(module, nnx.Module) and hasattr(module, "attention_blocks"):
            module.attention, module.attention_blocks = backend, block_sizes
            found += 1
    if not found:
        raise ValueError(f"use_attention: {type(model).__name__} has no attention modules "
                         "(jlora.models.attention.Attention)")
    return model
