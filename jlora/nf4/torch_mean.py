"""torch's CPU float32 `Tensor.mean()`, reproduced bit for bit in jnp.

Double quantization subtracts `offset = absmax.mean()` before quantizing the absmax values, so the
offset's last bit decides nested codes and every dequantized weight. float32 addition is not
associative: matching bitsandbytes means adding in the order torch's CPU kernel does
(aten/src/ATen/native/cpu/SumKernel.cpp, `cascade_sum`), then dividing by n in float32.

That kernel, for a contiguous float32 vector x of length n:

    lanes  = 8 float32 vectors (torch's AVX2 / NEON / default builds; the AVX-512 build keeps the
             AVX2 sum kernel), n // 8 of them, plus n % 8 trailing scalars
    row_sum(items)        = 4 interleaved accumulators over `multi_row_sum`, leftovers into the
                            first, then acc0 + acc1 + acc2 + acc3
    multi_row_sum(rows)   = a 4-level cascade: sequential sums of `step` rows, sums of `step` of
                            those, and so on, step = 2 ** max(4, ceil_log2(rows) // 4)
    sum = ((0 + tail scalars in order) + lane 0 + ... + lane 7)   when n >= 8, else row_sum(x)
    mean = sum / float32(n)

Every partial sum below is a sequential left fold in float32 from 0.0, so XLA cannot reorder it.
This is torch's single-thread order; torch splits sums of 32768 or more elements between threads,
so for matrices with more than 32768 * blocksize weights bitsandbytes' own offset depends on
`torch.get_num_threads()` (and on the CUDA reduction on GPU). The offset is stored with the tensor,
so checkpoints round-trip exactly either way.
"""
import jax.numpy as jnp
from jax import lax

LANES = 8
ILP = 4
LEVELS = 4


def _ceil_log2(x: int) -> int:
    """c10::utils::CeilLog2."""
    return 1 if x <= 2 else (x - 1).bit_length()


def _fold(xs: jnp.ndarray) -> jnp.ndarray:
    """((0 + xs[0]) + xs[1]) + ... over axis 0, in float32, in this order."""
    zero = jnp.zeros(xs.shape[1:], jnp.float32)
    if xs.shape[0] == 0:
        return zero
    return lax.fori_loop(0, xs.shape[0], lambda i, acc: acc + xs[i], zero)


def _fold_groups(xs: jnp.ndarray, step: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Fold each complete group of `step` consecutive items; fold the incomplete rest apart."""
    groups = xs.shape[0] // step
    full = xs[: groups * step].reshape((groups, step) + xs.shape[1:])
    return _fold(jnp.moveaxis(full, 1, 0)), _fold(xs[groups * step:])


def _multi_row_sum(rows: jnp.ndarray) -> jnp.ndarray:
    """`multi_row_sum`: rows [size, ILP, ...] -> [ILP, ...] with the 4-level cascade."""
    step = 1 << max(4, _ceil_log2(rows.shape[0]) // LEVELS)
    blocks, acc0 = _fold_groups(rows, step)  # level 0: runs of `step` rows
    level1, acc1 = _fold_groups(blocks, step)  # level 1: runs of `step` level-0 sums
    level2, acc2 = _fold_groups(level1, step)  # level 2: runs of `step` level-1 sums
    acc3 = _fold(level2)  # level 3 never flushes
    return ((acc0 + acc1) + acc2) + acc3


def _row_sum(items: jnp.ndarray) -> jnp.ndarray:
    """`row_sum`: items [size, ...] (scalars or 8-lane vectors) -> [...]."""
    size_ilp = items.shape[0] // ILP
    partial = _multi_row_sum(items[: size_ilp * ILP].reshape((size_ilp, ILP) + items.shape[1:]))
    acc = partial[0]
    for i in range(size_ilp * ILP, items.shape[0]):
        acc = acc + items[i]
    for k in range(1, ILP):
        acc = acc + partial[k]
    return acc


def torch_cpu_sum(x: jnp.ndarray) -> jnp.ndarray:
    """`x.sum()` of a 1-D float32 array as torch computes it on one CPU thread."""
    x = jnp.asarray(x, jnp.float32)
    n = x.shape[0]
    if n < LANES:
        return jnp.float32(0) + _row_sum(x)
    vectors = n // LANES
    lanes = _row_sum(x[: vectors * LANES].reshape(vectors, LANES))
    acc = jnp.float32(0)
    for k in range(vectors * LANES, n):
        acc = acc + x[k]
    for k in range(LANES):
        acc = acc + lanes[k]
    return jnp.float32(0) + acc


def torch_cpu_mean(x: jnp.ndarray) -> jnp.ndarray:
    """`x.mean()` of a 1-D float32 array as torch computes it on one CPU thread: sum / n."""
    total = torch_cpu_sum(x)
    # XLA turns division by a constant into multiplication by its rounded reciprocal, which is
    # off by one ulp for many n. `total - total` is 0.0 for finite totals but not foldable.
    return total / (jnp.float32(x.shape[0]) + (total - total))
