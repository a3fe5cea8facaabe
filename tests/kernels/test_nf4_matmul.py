"""The NF4 Pallas kernels under the TPU interpreter: the tile is dequantize(), bit for bit.

``pltpu.InterpretParams(uninitialized_memory="nan")`` simulates Mosaic's
memory: uninitialised VMEM reads (a W-cache slot read before it was filled, the
padded rows of a ragged last row block) come back as NaN. Multiplying by
one-hot rows reads single weights out of the kernel exactly: x = I[:M] gives
y = W[:, :M].T and dy = I[:M] gives dx = W[:M], which must equal
``jlora.nf4.dequantize`` in every bit (one nonzero product, fp32 accumulation).
The forward runs in bfloat16 and dx in float32 (the other two pairings
compile two more interpret-mode kernels for little more coverage).
M = 200 with 64-row blocks leaves a ragged last block (200 = 3 * 64 + 8) and
turns on the weight-stationary cache; the 256-wide K tiles are two cache slots.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from jlora import nf4
from jlora.kernels.nf4_matmul import absmax_tiles
from jlora.kernels.nf4_matmul import nf4_matmul_dx_pallas
from jlora.kernels.nf4_matmul import nf4_matmul_fwd_pallas
from jlora.nf4.dequantize import absmax_f32


@pytest.mark.parametrize("fwd_dtype,dx_dtype", [(jnp.bfloat16, jnp.float32)])
def test_kernel_tiles_equal_dequantize(fwd_dtype, dx_dtype):
    n, k, m, r, blocksize = 256, 512, 200, 8, 64
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((n, k)), jnp.float32) * jnp.asarray(
        rng.uniform(0.01, 3.0, (n, 1)), jnp.float32)  # rows of different scale
    q = nf4.quantize(w, blocksize=blocksize, double_quant=True)
    want = {dt: np.asarray(nf4.dequantize(q, dt), np.float32)
            for dt in (fwd_dtype, dx_dtype)}
    absmax = absmax_f32(q)
    codes = q.codes.reshape(n, k // 2)
    zeros = lambda dt, *shape: jnp.zeros(shape, dt)  # noqa: E731
    params = pltpu.InterpretParams(uninitialized_memory="nan")
    blocks = dict(blocksize=blocksize, block_m=64, block_n=128, block_k=256,
                  cache=True, interpret=params)

    x = jnp.eye(m, k, dtype=fwd_dtype)
    y = nf4_matmul_fwd_pallas(x, codes, absmax_tiles(absmax, n, k, blocksize, 256),
                              zeros(fwd_dtype, m, r), zeros(fwd_dtype, r, n),
                              **blocks)
    y = np.asarray(y, np.float32)
    assert not np.isnan(y).any()
    np.testing.assert_array_equal(y.view(np.uint32),
                                  want[fwd_dtype][:, :m].T.copy().view(np.uint32))

    dy = jnp.eye(m, n, dtype=dx_dtype)
    dx = nf4_matmul_dx_pallas(dy, codes, absmax_tiles(absmax, n, k, blocksize, 256),
                              zeros(dx_dtype, m, r), zeros(dx_dtype, k, r), **blocks)
    dx = np.asarray(dx, np.float32)
    assert not np.isnan(dx).any()
    np.testing.assert_array_equal(dx.view(np.uint32), want[dx_dtype][:m].view(np.uint32))
