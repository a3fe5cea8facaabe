"""Fused NF4 dequant + matmul + low-rank epilogue: Pallas TPU kernels for both passes.

    forward:  y  = x @ W.T + lo @ lo_rhs        W [N, K] = dequantize(w_nf4)
    dx:       dx = dy @ W  + g  @ a.T

W is never written to HBM: each grid step DMAs its tile of packed codes (uint8,
two weights per byte) and of per-block float32 absmax, dequantizes it in VMEM
and feeds the MXU. The layout decisions, all made so Mosaic lowers them:

* Unpacking by lane gather. ``jnp.take_along_axis`` on a [rows, 128] value
  lowers to Mosaic's ``tpu.dynamic_gather`` (a lane permutation inside one
  vreg). Byte ``j`` of a row holds weights ``2j`` (high nibble) and ``2j + 1``
  (low nibble); a 128-byte chunk of codes becomes two 128-weight chunks in
  order: output lane ``L`` of the first gathers byte ``L >> 1``, of the second
  byte ``64 + (L >> 1)``, then shifts by 4 on even lanes. So the tile comes out
  in W's own column order: x, dx and a are used as they are, with one full-depth
  matmul per step and no de-interleaving pass over activations in XLA.
* Lookup by lane gather too. Per group of 8 NF4 blocks the kernel builds a
  [rows, 128] table ``code[c] * absmax[row, blk]`` at lane ``16 * blk + c``
  (absmax itself picked by a gather), then every weight is one gather at lane
  ``16 * blk + nibble`` (a 15-select tree costs ~4x more vector ops in the
  compiled kernel). The product is the same float32 ``code * absmax`` that
  ``jlora.nf4.dequantize`` computes, so the tile equals
  ``dequantize(w_nf4, dtype)`` bit for bit.
* absmax in float32, decoded in XLA. Double-quantized absmax (uint8 codes,
  ``nested_code[q] * nested_absmax + offset``) is decoded by ``jlora.nf4``
  before the call: [N * K / blocksize] floats, 1/32 of a bf16 W at blocksize
  64. It is passed as [K / bk, N, bk / blocksize] so a tile's absmax is one
  legal block (its last dimension is the whole array dimension).
* Weight-stationary reuse. When M spans more than one row block, the
  dequantized tiles of the current N band (forward; K band for dx) are kept in
  a VMEM scratch, filled while the first row block runs and reused by the
  others, so each weight is dequantized once per call rather than once per
  row block. The row axis then runs in order ("arbitrary"); the band axis stays
  "parallel" (megacore). Without the cache (decode: a single row block) the
  scratch holds one tile.

Shapes the wrapper guarantees: K a multiple of 256 and of blocksize;
``bk`` a multiple of 256 and of blocksize with ``bk / blocksize <= 128``;
``bk`` divides K and ``bn`` divides N; M may be ragged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jlora.nf4.codebook import NF4_CODE
from jlora.nf4.dequantize import weight_from_codes

LANES = 128
# NF4 blocks per lookup table: 8 blocks x 16 codes = 128 lanes.
TABLE_BLOCKS = LANES // 16
# Rows dequantized per loop step: a multiple of uint8's 32-row VMEM tile.
ROW_SLAB = 32


def lane_code_table() -> jax.Array:
    """float32 [8, 128]: NF4_CODE[lane % 16] in every row (the kernel's table seed)."""
    return jnp.asarray(np.tile(NF4_CODE, (8, LANES // 16)))


def absmax_tiles(absmax: jax.Array, n: int, k: int, blocksize: int,
                 block_k: int) -> jax.Array:
    """float32 absmax [N * K / blocksize] -> [K / block_k, N, block_k / blocksize]."""
    per_tile = block_k // blocksize
    return absmax.reshape(n, k // block_k, per_tile).transpose(1, 0, 2)


def _dequant_tile(w_ref, slot, codes_ref, absmax_ref, lane_code_ref, *,
                  blocksize: int):
    """Writes the dequantized tile [bn, bk] into ``w_ref[slot]`` (W's column order).

    codes_ref: uint8 [bn, bk / 2] (bk a multiple of 256); absmax_ref: float32
    [bn, bk / blocksize]; lane_code_ref: float32 [8, 128] (NF4_CODE[lane % 16]).
    Runs over slabs of ``ROW_SLAB`` rows in a loop, so the unrolled vector code
    (and Mosaic's compile time) stays one slab's size.
    """
    bn, half = codes_ref.shape
    per_tile = absmax_ref.shape[1]
    slab = ROW_SLAB if bn % ROW_SLAB == 0 else bn
    # Index vectors depend on the lane only: built on one row, broadcast over
    # sublanes (integer shifts, not //, which Mosaic lowers through sign()).
    lane = lax.broadcasted_iota(jnp.int32, (1, LANES), 1)
    nibble_shift = 4 - 4 * (lane & 1)      # even weights sit in the high nibble
    block_shift = blocksize.bit_length() - 1
    lane_code = lane_code_ref[0:1, :]

    def body(s, carry):
        rows = pl.ds(pl.multiple_of(s * slab, slab), slab)
        codes = codes_ref[rows, :].astype(jnp.int32)  # no 8-bit shifts on v4-v6e
        absmax = jnp.pad(absmax_ref[rows, :], ((0, 0), (0, LANES - per_tile)))
        tables = {}
        for q in range(half // LANES):
            byte_chunk = codes[:, q * LANES:(q + 1) * LANES]
            for part in (0, 1):  # weights [256q, 256q + 128) and [256q + 128, 256q + 256)
                c = 2 * q + part
                group = ((c * LANES) >> block_shift) // TABLE_BLOCKS
                if group not in tables:
                    block = jnp.broadcast_to(TABLE_BLOCKS * group + (lane >> 4),
                                             (slab, LANES))
                    scale = jnp.take_along_axis(absmax, block, axis=1,
                                                mode="promise_in_bounds")
                    tables[group] = lane_code * scale
                byte_lane = jnp.broadcast_to(64 * part + (lane >> 1), (slab, LANES))
                byte = jnp.take_along_axis(byte_chunk, byte_lane, axis=1,
                                           mode="promise_in_bounds")
                nibble = (byte >> nibble_shift) & 0xF
                block_in_group = (((c * LANES + lane) >> block_shift)
                                  - TABLE_BLOCKS * group)
                weight = jnp.take_along_axis(tables[group],
                                             (block_in_group << 4) | nibble, axis=1,
                                             mode="promise_in_bounds")
                w_ref[slot, rows, c * LANES:(c + 1) * LANES] = (
                    weight.astype(w_ref.dtype))
        return carry

    lax.fori_loop(0, bn // slab, body, 0)


def _dot(lhs, rhs, transpose_rhs: bool):
    contract_rhs = 1 if transpose_rhs else 0
    return lax.dot_general(lhs, rhs, (((1,), (contract_rhs,)), ((), ())),
                           preferred_element_type=jnp.float32)


def _fill(cache: bool, first_row_block, fill_fn):
    if cache:
        pl.when(first_row_block)(fill_fn)
    else:
        fill_fn()


def _kernel(lhs_ref, codes_ref, absmax_ref, lane_code_ref, lo_ref, lo_rhs_ref,
            out_ref, acc_ref, w_ref, *, blocksize: int, cache: bool, forward: bool):
    """One output tile, reducing over grid axis 2, with W's tiles dequantized into VMEM:

        forward:  y  = x  @ W^T + xa @ b        (lhs x,  lo xa, lo_rhs b)
        dx:       dx = dy @ W   + g  @ a^T      (lhs dy, lo g,  lo_rhs a)
    """
    i, j = pl.program_id(1), pl.program_id(2)
    slot = j if cache else 0

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    _fill(cache, i == 0, lambda: _dequant_tile(
        w_ref, slot, codes_ref, absmax_ref, lane_code_ref, blocksize=blocksize))
    acc_ref[...] += _dot(lhs_ref[...], w_ref[slot], transpose_rhs=forward)

    @pl.when(j == pl.num_programs(2) - 1)
    def _epilogue():
        low_rank = _dot(lo_ref[...], lo_rhs_ref[...], transpose_rhs=not forward)
        out_ref[...] = (acc_ref[...] + low_rank).astype(out_ref.dtype)


def _semantics(cache: bool):
    # With the cache, row blocks after the first reuse what the first filled:
    # the row axis must run in order on one core; the band axis stays parallel.
    return ("parallel", "arbitrary" if cache else "parallel", "arbitrary")


@functools.partial(
    jax.jit, static_argnames=("blocksize", "block_m", "block_n", "block_k",
                              "cache", "interpret"))
def nf4_matmul_fwd_pallas(x, codes, absmax, lo, lo_rhs, *, blocksize: int,
                          block_m: int, block_n: int, block_k: int, cache: bool,
                          interpret=False):
    """y [M, N] = x @ W.T + lo @ lo_rhs, W dequantized per tile.

    x: [M, K]; codes: uint8 [N, K/2] (the NF4Tensor's flat codes, reshaped);
    absmax: float32 [K / block_k, N, block_k / blocksize] (``absmax_tiles``);
    lo: [M, r]; lo_rhs: [r, N]. Grid (N / block_n, M / block_m, K / block_k).
    ``cache`` keeps the N band's dequantized tiles in VMEM across row blocks.
    """
    m, k = x.shape
    n = codes.shape[0]
    r = lo.shape[1]
    bm, bn, bk = block_m, block_n, block_k
    nk = k // bk
    dtype = x.dtype
    itemsize = jnp.dtype(dtype).itemsize
    grid = (n // bn, pl.cdiv(m, bm), nk)
    if cache:  # after the first row block keep the last tile's index: no DMA.
        w_col = lambda i, kk: jnp.where(i == 0, kk, nk - 1)  # noqa: E731
    else:
        w_col = lambda i, kk: kk  # noqa: E731
    cost = pl.CostEstimate(
        flops=2 * m * n * (k + r),
        transcendentals=0,
        bytes_accessed=(itemsize * (m * k * grid[0] + m * n + m * r + r * n)
                        + (n * k // 2 + 4 * n * k // blocksize)
                        * (1 if cache else grid[1])))
    return pl.pallas_call(
        functools.partial(_kernel, blocksize=blocksize, cache=cache, forward=True),
        out_shape=jax.ShapeDtypeStruct((m, n), dtype),
        grid=grid,
        in_specs=[
            pl.BlockSpec((bm, bk), lambda j, i, kk: (i, kk)),
            pl.BlockSpec((bn, bk // 2), lambda j, i, kk: (j, w_col(i, kk))),
            pl.BlockSpec((None, bn, bk // blocksize),
                         lambda j, i, kk: (w_col(i, kk), j, 0)),
            pl.BlockSpec((8, LANES), lambda j, i, kk: (0, 0)),
            pl.BlockSpec((bm, r), lambda j, i, kk: (i, 0)),
            pl.BlockSpec((r, bn), lambda j, i, kk: (0, j)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda j, i, kk: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32),
                        pltpu.VMEM((nk if cache else 1, bn, bk), dtype)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=_semantics(cache)),
        cost_estimate=cost,
        interpret=interpret,
        name="nf4_lora_fwd",
    )(x, codes, absmax, lane_code_table(), lo, lo_rhs)


@functools.partial(
    jax.jit, static_argnames=("blocksize", "block_m", "block_n", "block_k",
                              "cache", "interpret"))
def nf4_matmul_dx_pallas(dy, codes, absmax, g, a, *, blocksize: int, block_m: int,
                         block_n: int, block_k: int, cache: bool, interpret=False):
    """dx [M, K] = dy @ W + g @ a.T, W dequantized per tile.

    dy: [M, N]; codes: uint8 [N, K/2]; absmax: ``absmax_tiles(.., block_k)``;
    g: [M, r]; a: [K, r]. Grid (K / block_k, M / block_m, N / block_n), N
    contracted last; ``cache`` keeps the K band's tiles across row blocks.
    """
    m, n = dy.shape
    k = a.shape[0]
    r = g.shape[1]
    bm, bn, bk = block_m, block_n, block_k
    nn_blocks = n // bn
    dtype = dy.dtype
    itemsize = jnp.dtype(dtype).itemsize
    grid = (k // bk, pl.cdiv(m, bm), nn_blocks)
    if cache:
        w_row = lambda i, nn: jnp.where(i == 0, nn, nn_blocks - 1)  # noqa: E731
    else:
        w_row = lambda i, nn: nn  # noqa: E731
    cost = pl.CostEstimate(
        flops=2 * m * k * (n + r),
        transcendentals=0,
        bytes_accessed=(itemsize * (m * n * grid[0] + m * k + m * r + k * r)
                        + (n * k // 2 + 4 * n * k // blocksize)
                        * (1 if cache else grid[1])))
    return pl.pallas_call(
        functools.partial(_kernel, blocksize=blocksize, cache=cache, forward=False),
        out_shape=jax.ShapeDtypeStruct((m, k), dtype),
        grid=grid,
        in_specs=[
            pl.BlockSpec((bm, bn), lambda kk, i, nn: (i, nn)),
            pl.BlockSpec((bn, bk // 2), lambda kk, i, nn: (w_row(i, nn), kk)),
            pl.BlockSpec((None, bn, bk // blocksize),
                         lambda kk, i, nn: (kk, w_row(i, nn), 0)),
            pl.BlockSpec((8, LANES), lambda kk, i, nn: (0, 0)),
            pl.BlockSpec((bm, r), lambda kk, i, nn: (i, 0)),
            pl.BlockSpec((bk, r), lambda kk, i, nn: (kk, 0)),
        ],
        out_specs=pl.BlockSpec((bm, bk), lambda kk, i, nn: (i, kk)),
        scratch_shapes=[pltpu.VMEM((bm, bk), jnp.float32),
                        pltpu.VMEM((nn_blocks if cache else 1, bn, bk), dtype)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=_semantics(cache)),
        cost_estimate=cost,
        interpret=interpret,
        name="nf4_lora_dx",
    )(dy, codes, absmax, lane_code_table(), g, a)


def dequantize_xla(codes: jax.Array, absmax: jax.Array, *, shape: tuple[int, int],
                   blocksize: int, dtype) -> jax.Array:
    """W [N, K] in ``dtype`` from flat packed codes and float32 absmax, in XLA.

    ``jlora.nf4.dequantize``'s own computation (blocks over the flattened
    weight, so K need not be a multiple of blocksize); the XLA backend and the
    Triton dx fallback use it.
    """
    return weight_from_codes(codes, absmax, shape=shape, blocksize=blocksize, dtype=dtype)
