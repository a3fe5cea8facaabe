"""TPU splash attention (jax.experimental.pallas.ops.tpu.splash_attention) behind jlora's attention contract.

    out = softmax(softcap(q k^T * scale) + mask) v     mask: causal, same segment, within the window

What maps to what:
    scale            q * scale before the kernel (splash computes q k^T unscaled)
    causal / window  CausalMask, or LocalMask((window - 1, 0)) (keys q - window < k <= q), the same
                     static mask for every head (MultiHeadMask); splash skips the blocks it rules out
    packing          SegmentIds(q=segment_ids, kv=segment_ids) per row (the kernel is vmapped over rows)
    grouped kv heads make_splash_mha with k, v [kv_heads, T, d]: query head h reads kv head h // group,
                     which is jlora's [kv_heads, group] head order flattened
    soft cap         attn_logits_soft_cap (tanh after scaling, before the mask: the same order)

The kernel needs every block to be a multiple of 128 and to divide the row: the row is padded to a
multiple of the blocks with segment id -1 (padded keys follow every real query, so causality hides
them; padded queries see only padded keys and are sliced off). Default blocks: 512 for q and kv in
forward and backward (MaxText's base.yml), capped at the row rounded up to 128; rows of LONG_ROW
tokens or more on a known TPU generation take that generation's blocks (GENERATION_BLOCKS).

Where it runs: on TPU the Mosaic kernel; on CPU the same kernel in Pallas interpret mode (slow: for
tests). Both are lowered from one trace by `lax.platform_dependent`, so a step traced on a CPU host
and compiled for a TPU topology (jlora plan) gets the Mosaic kernel.

On a device mesh (`mesh`, or the one set by `jax.set_mesh`) the kernel runs per device under
`shard_map`: rows over (data, fsdp), kv heads over tensor where they divide; a Mosaic kernel is an
opaque custom call that XLA cannot partition by itself. Meshes that split rows the same number of ways get
the same per-device kernel: on the 8-layer plan model (tests/plan/tiny_plans.py, 8 x 128 tokens, v5e:2x2,
remat full) libtpu held 11.5 MB of temporaries with fsdp=4 and 11.8 MB with data=2,fsdp=2 at its default
effort, 31.6 vs 27.7 MB at the fast effort `jlora plan` uses (exec_time_optimization_effort=-1); the 18 MB
once seen (57.7 vs 39.9 MB, loop layers, fast effort) came from that quick schedule, not from this wrapper
(blockwise attention shows the same kind of spread: 10.2 vs 10.3 MB default effort).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jlora.attention.blockwise import BlockSizes as JloraBlockSizes
from jlora.attention.masks import check_inputs

LANES = 128
DEFAULT_BLOCK = 512
LONG_ROW = 8192

# Blocks per TPU generation for rows of LONG_ROW tokens or more. Source: MaxText's tuned Llama runs
# (github.com/AI-Hypercomputer/maxtext at e591f30, benchmarks/): maxtext_v5e_model_configs.py
# llama3_1-8b-8192-v5e-256, maxtext_v5p_model_configs.py llama3-1-405b-8192-v5p-1024,
# maxtext_trillium_model_configs.py llama3_1-8b-8192 and llama3_1_70b_131072 (v6e) set every sa_block_* to
# 2048 (with sa_use_fused_bwd_kernel on v5e and v6e); base.yml's default is 512 everywhere. Those runs also
# raise libtpu's scoped VMEM limit (--xla_tpu_scoped_vmem_limit_kib=98304: xla_flags_library.py
# DENSE_VMEM_LIMIT_FLAG), which jlora does not set. Compiled here (libtpu 0.10.2, no TPU; splash forward +
# backward, T 8192, 32 query heads / 8 kv heads of 128, bf16; under load):
#   2048 everywhere                    v5e: CompileTimeScopedVmemOom (compiles with the raised limit)
#   2048 q/kv, 512-key compute blocks  v5e, v5p: CompileTimeScopedVmemOom; v6e (more VMEM): compiles
#   1024 q/kv, 512-key compute blocks  v5e, v5p: compile (v5e temporaries 147 MB, as with 512 blocks)
#   fused backward (1024, raised limit) v5e: 711 MB of temporaries against 282 MB unfused
# So jlora takes MaxText's larger DMA tiles as far as the default limit allows (2048-token q and kv blocks on
# v6e, 1024 on v5e and v5p; 512-key compute sub-blocks) and keeps the unfused backward (the fused one holds
# per-head dq partials: 2.5x the temporaries). tests/long_context/test_splash_blocks.py (slow) compiles each.
def _long_blocks(block: int) -> dict:
    return dict(block_q=block, block_kv=block, block_kv_compute=512, block_q_dkv=block, block_kv_dkv=block,
                block_kv_dkv_compute=512, block_q_dq=block, block_kv_dq=512)


GENERATION_BLOCKS = {"v5e": _long_blocks(1024), "v5p": _long_blocks(1024), "v6e": _long_blocks(2048)}
_DEVICE_KINDS = {"TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5": "v5p", "TPU v5p": "v5p", "TPU v6 lite": "v6e",
                 "TPU v6e": "v6e"}


def _splash():
    from jax.experimental.pallas.ops.tpu import splash_attention  # pylint: disable=import-outside-toplevel
    return splash_attention


def tpu_generation(mesh=None) -> str | None:
    """"v5e" | "v5p" | "v6e" for the TPU the step is traced for (the devices of `mesh`, of the mesh set by
    jax.set_mesh, or this process's TPU), None when unknown (CPU tests, other generations)."""
    kind = None
    if isinstance(mesh, jax.sharding.Mesh):
        kind = mesh.devices.flat[0].device_kind
    for abstract in (mesh, jax.sharding.get_abstract_mesh()):
        if kind is None and abstract is not None:
            kind = getattr(getattr(abstract, "abstract_device", None), "device_kind", None)
    if kind is None and jax.default_backend() == "tpu":
        kind = jax.devices()[0].device_kind
    return _DEVICE_KINDS.get(kind)


def splash_block_sizes(seq_len: int, block_sizes=None, generation: str | None = None):
    """The splash BlockSizes for a row of `seq_len`: `block_sizes` as given (splash's own BlockSizes), a
    jlora BlockSizes(q, k) applied to every phase, or None: GENERATION_BLOCKS[generation] when the row has
    LONG_ROW tokens or more, else DEFAULT_BLOCK capped at seq_len rounded up to 128. Every block must be a
    multiple of 128 (the kernel's lane width)."""
    sa = _splash()
    if isinstance(block_sizes, sa.BlockSizes):
        blocks = block_sizes
    elif block_sizes is None and generation in GENERATION_BLOCKS and seq_len >= LONG_ROW:
        blocks = sa.BlockSizes(**GENERATION_BLOCKS[generation])
    else:
        if block_sizes is None:
            bq = bk = min(DEFAULT_BLOCK, -(-seq_len // LANES) * LANES)
        elif isinstance(block_sizes, JloraBlockSizes):
            bq, bk = block_sizes.q, block_sizes.k
        else:
            raise TypeError(f"splash block_sizes must be jlora.attention.BlockSizes, splash_attention.BlockSizes "
                            f"or None, got {type(block_sizes).__name__}")
        blocks = sa.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                               block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
    for name, value in _block_values(blocks).items():
        if value % LANES:
            raise ValueError(f"splash attention: block size {name}={value} must be a multiple of {LANES}")
    return blocks


def _block_values(blocks) -> dict:
    return {f.name: getattr(blocks, f.name) for f in dataclasses.fields(blocks)
            if f.name.startswith("block") and getattr(blocks, f.name) is not None}


def padded_length(seq_len: int, blocks) -> int:
    """seq_len rounded up to a multiple of every block (what the kernel is called on)."""
    step = functools.reduce(math.lcm, _block_values(blocks).values())
    return -(-seq_len // step) * step


def _block_state(q0: int, q1: int, k0: int, k1: int, window: int | None):
    """True when every query in [q0, q1) sees every key in [k0, k1) (k <= q, q - k < window), False when
    none does, None when the block is partial."""
    if k0 > q1 - 1 or (window is not None and q0 - (k1 - 1) >= window):
        return False
    if k1 - 1 <= q0 and (window is None or (q1 - 1) - k0 < window):
        return True
    return None


_ALL, _NONE = np.ones((1, 1), np.bool_), np.zeros((1, 1), np.bool_)


def _classified(base):
    """`base` (splash's CausalMask or LocalMask) whose __getitem__ answers a wholly visible or wholly hidden
    block with a [1, 1] constant instead of evaluating it: splash's mask processing (mask_info) only asks
    such a block `.any()` and `.all()`, and evaluating every [block_q, block_kv] block of the [T, T] mask in
    numpy took 212 s at T 131072 with 512 blocks (under load). Partial blocks (the diagonal band) are
    evaluated as before; tests/long_context/test_splash.py checks the MaskInfo equals splash's own."""

    class Classified(base):
        window: int | None = None

        def __getitem__(self, idx):
            q_slice, kv_slice = idx
            q0, q1, _ = q_slice.indices(self.shape[0])
            k0, k1, _ = kv_slice.indices(self.shape[1])
            state = _block_state(q0, q1, k0, k1, self.window)
            if state is None or q_slice.step not in (None, 1) or kv_slice.step not in (None, 1):
                return super().__getitem__(idx)
            return _ALL if state else _NONE

    Classified.__name__ = Classified.__qualname__ = f"Classified{base.__name__}"
    return Classified


@functools.cache
def _mask_classes():
    sa = _splash()
    return _classified(sa.CausalMask), _classified(sa.LocalMask)


def _mask(t: int, window: int | None):
    """The [t, t] causal (window None) or local mask: keys q - window < k <= q."""
    causal, local = _mask_classes()
    if window is None:
        return causal((t, t))
    mask = local((t, t), (window - 1, 0), 0)
    mask.window = window
    return mask


def _kernel(heads: int, t: int, window: int | None, cap: float | None, blocks, interpret: bool):
    """Made per trace (its MaskInfo arrays become constants of that trace; caching the kernel across traces
    would leak them); splash caches the numpy mask processing itself (mask_info._process_mask)."""
    sa = _splash()
    return sa.make_splash_mha(sa.MultiHeadMask([_mask(t, window)] * heads), block_sizes=blocks, head_shards=1,
                              q_seq_shards=1, attn_logits_soft_cap=cap, interpret=interpret)


def splash_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, segment_ids: jnp.ndarray, *,
                     sliding_window: int | None = None, scale: float, logit_softcap: float | None = None,
                     block_sizes=None, mesh=None) -> jnp.ndarray:
    """q [b, t, kv_heads, group, d], k and v [b, t, kv_heads, d], segment_ids [b, t] -> [b, t, kv_heads, group, d].

    The same function as jlora.attention.reference_attention, by the splash kernel (module docstring)."""
    b, t, kv, g, d = q.shape
    check_inputs("splash_attention", q, k, v, segment_ids, sliding_window=sliding_window,
                 logit_softcap=logit_softcap)
    mesh = mesh if mesh is not None else _context_mesh()
    blocks = splash_block_sizes(t, block_sizes, tpu_generation(mesh))
    cap = None if logit_softcap is None else float(logit_softcap)
    call = functools.partial(_per_device, window=sliding_window, scale=float(scale), cap=cap, blocks=blocks)
    if mesh is None or mesh.size == 1:
        return call(q, k, v, segment_ids)
    return _sharded(call, mesh, q, k, v, segment_ids)


def _per_device(q, k, v, segment_ids, *, window, scale, cap, blocks):
    b, t, kv, g, d = q.shape
    tp = padded_length(t, blocks)
    seg = segment_ids.astype(jnp.int32)
    qh = jnp.moveaxis((q * jnp.asarray(scale, q.dtype)).reshape(b, t, kv * g, d), 1, 2)   # [b, heads, t, d]
    kh, vh = jnp.moveaxis(k, 1, 2), jnp.moveaxis(v, 1, 2)                              # [b, kv, t, d]
    if tp != t:
        qh, kh, vh = (jnp.pad(a, ((0, 0), (0, 0), (0, tp - t), (0, 0))) for a in (qh, kh, vh))
        seg = jnp.pad(seg, ((0, 0), (0, tp - t)), constant_values=-1)

    def run(interpret):
        kernel = _kernel(kv * g, tp, window, cap, blocks, interpret)
        sa = _splash()
        return lambda qh, kh, vh, seg: jax.vmap(
            lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=sa.SegmentIds(s1, s1)))(qh, kh, vh, seg)

    out = jax.lax.platform_dependent(qh, kh, vh, seg, cpu=run(True), default=run(False))   # [b, heads, tp, d]
    return jnp.moveaxis(out[:, :, :t], 1, 2).reshape(b, t, kv, g, d)


def _context_mesh():
    """The mesh set by `jax.set_mesh` (None without one, or inside a shard_map: already per device)."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty or mesh.manual_axes else mesh


def _sharded(call, mesh, q, k, v, segment_ids):
    """call per device: rows over (data, fsdp) when they divide, kv heads over tensor when they divide."""
    from jlora.mesh_axes import ROW_AXES  # pylint: disable=import-outside-toplevel

    names = set(mesh.axis_names)
    row_axes = tuple(a for a in ROW_AXES if a in names)
    row_size = math.prod(mesh.shape[a] for a in row_axes)
    rows = row_axes if row_axes and q.shape[0] % row_size == 0 else None
    heads = "tensor" if "tensor" in names and q.shape[2] % mesh.shape["tensor"] == 0 else None
    q_spec, kv_spec = P(rows, None, heads, None, None), P(rows, None, heads, None)
    return jax.shard_map(call, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, P(rows, None)), out_specs=q_spec,
                         check_vma=False)(q, k, v, segment_ids)
