"""The Pallas kernel under the TPU interpreter, which models VMEM blocks.

``pltpu.InterpretParams`` simulates Mosaic's memory (uninitialised VMEM reads
come back as NaN, out-of-bounds block rows included). A ragged last row block
(136 = 2 * 64 + 8) must be masked, never leak into the output.
"""

import jax
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from jlora.kernels.fused_matmul import fused_matmul_pallas
from jlora.kernels.fused_matmul import fused_matmul_xla


@pytest.mark.parametrize("transpose_rhs", [False, True], ids=["y", "dx"])
def test_tpu_interpreter_ragged_rows(transpose_rhs):
    m, c, o, r = 136, 256, 256, 8
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    lhs = jax.random.normal(k1, (m, c))
    rhs = jax.random.normal(k2, (o, c) if transpose_rhs else (c, o)) / 16
    lo = jax.random.normal(k3, (m, r))
    lo_rhs = jax.random.normal(k4, (o, r) if transpose_rhs else (r, o))
    params = pltpu.InterpretParams(uninitialized_memory="nan")
    got = fused_matmul_pallas(lhs, rhs, lo, lo_rhs, transpose_rhs=transpose_rhs,
                              block_rows=64, block_out=128, block_contract=128,
                              interpret=params)
    want = fused_matmul_xla(lhs, rhs, lo, lo_rhs, transpose_rhs=transpose_rhs)
    assert not np.isnan(np.asarray(got)).any()
    np.testing.assert_allclose(np.asarray(got), np.asarray(want),
                               rtol=1e-5, atol=1e-4)
