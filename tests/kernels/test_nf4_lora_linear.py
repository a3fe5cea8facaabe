"""nf4_lora_linear (Pallas in interpret mode, and XLA) against nf4_lora_linear_reference.

Forward output and jax.vjp gradients in x, a and b over a generated table of
(M, r) cells: M alternates 40 and 136 (both leave a ragged last row block) over
r in 1, 8, 64, 256, while (K, N), the NF4 blocksize (32, 64, 128), double
quantization and the tiles cycle. Each cell runs once on Pallas and once on
XLA, in opposite dtypes that alternate down the table, so Pallas sees both
float32 and bfloat16 (interpret mode costs seconds per compiled kernel, so the
full cross is too slow). Row blocks smaller than M turn on the kernels'
weight-stationary cache; row blocks larger than M leave it off: both occur.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora import kernels
from jlora import nf4
from jlora.kernels import BlockSizes

SCALE = 2.0

# max |got - want| <= TOL * max(1, max |want|), per compute dtype.
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}

CELLS = ((40, 1), (136, 8), (40, 64), (136, 256))
KN = ((256, 128), (512, 256), (256, 256), (512, 128))
BLOCKSIZES = (64, 32, 128, 64)
TILES = (BlockSizes(32, 128, 256, 32, 256, 128),    # M > block_m: cached W band
         BlockSizes(256, 128, 256, 256, 256, 128),  # M < block_m: one row block
         BlockSizes(64, 128, 256, 32, 256, 256),    # mixed
         BlockSizes(64, 128, 512, 256, 256, 128))
DTYPES = (jnp.float32, jnp.bfloat16)


def _cases():
    cases = []
    for i, (m, r) in enumerate(CELLS):
        k, n = KN[i]
        tiles = TILES[i]
        tiles = dataclasses.replace(tiles, block_k=min(tiles.block_k, k),
                                    block_n_dx=min(tiles.block_n_dx, n))
        for j, impl in enumerate(("pallas", "xla")):
            dtype = DTYPES[(i + j) % 2]
            cases.append((impl, dtype, m, k, n, r, BLOCKSIZES[i], i % 2 == 0, tiles))
    return cases


CASES = _cases()


def _case_id(case):
    impl, dtype, m, k, n, r, blocksize, dq, t = case
    name = "f32" if dtype == jnp.float32 else "bf16"
    return (f"{impl}-{name}-m{m}-k{k}-n{n}-r{r}-bs{blocksize}{'-dq' if dq else ''}"
            f"-b{t.block_m}x{t.block_n}x{t.block_k}")


@functools.cache
def quantized(n, k, blocksize, double_quant, seed=1):
    w = jax.random.normal(jax.random.key(seed), (n, k)) / np.sqrt(k)
    return nf4.quantize(w.astype(jnp.bfloat16), blocksize=blocksize,
                        double_quant=double_quant)


def make_inputs(m, k, n, r, dtype, seed=0):
    """O(1) activations and outputs; adapters kept in float32 like a trainer."""
    kx, ka, kb, kd = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(kx, (m, k)).astype(dtype)
    a = jax.random.normal(ka, (k, r)) / np.sqrt(k)
    b = jax.random.normal(kb, (r, n)) / np.sqrt(r)
    dy = jax.random.normal(kd, (m, n)).astype(dtype)
    return x, a, b, dy


def assert_close(got, want, dtype, what):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, what
    err = np.abs(got - want).max()
    bound = TOL[dtype] * max(1.0, np.abs(want).max())
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def vjp_of(fn, x, q, a, b, dy):
    """y and the (x, a, b) cotangents, as one jitted computation."""
    @jax.jit
    def run(x, q, a, b, dy):
        y, vjp = jax.vjp(lambda x, a, b: fn(x, q, a, b, scale=SCALE), x, a, b)
        return y, vjp(dy)
    return run(x, q, a, b, dy)


@pytest.mark.parametrize("impl,dtype,m,k,n,r,blocksize,double_quant,tiles", CASES,
                         ids=[_case_id(c) for c in CASES])
def test_matches_reference(impl, dtype, m, k, n, r, blocksize, double_quant, tiles):
    q = quantized(n, k, blocksize, double_quant)
    x, a, b, dy = make_inputs(m, k, n, r, dtype)

    def fused(x, q, a, b, *, scale):
        return kernels.nf4_lora_linear(x, q, a, b, scale=scale, impl=impl,
                                       interpret=True, block_sizes=tiles)

    y, (dx, da, db) = vjp_of(fused, x, q, a, b, dy)
    y_ref, (dx_ref, da_ref, db_ref) = vjp_of(kernels.nf4_lora_linear_reference,
                                             x, q, a, b, dy)
    assert y.dtype == x.dtype and dx.dtype == x.dtype
    assert da.dtype == a.dtype and db.dtype == b.dtype
    assert_close(y, y_ref, dtype, "y")
    assert_close(dx, dx_ref, dtype, "dx")
    assert_close(da, da_ref, dtype, "da")
    assert_close(db, db_ref, dtype, "db")


def test_leading_dims_traced_scale_and_default_tiles():
    """[B, T, K] input, auto impl (Pallas under interpret) with its own tiles."""
    q = quantized(128, 256, 64, True)
    x, a, b, dy = make_inputs(48, 256, 128, 16, jnp.bfloat16)

    @jax.jit
    def step(scale, x3, a, b):
        y, vjp = jax.vjp(lambda x3, a, b: kernels.nf4_lora_linear(
            x3, q, a, b, scale=scale, interpret=True), x3, a, b)
        return y, vjp(dy.reshape(2, 24, 128))

    y, (dx, da, db) = step(jnp.float32(0.5), x.reshape(2, 24, 256), a, b)
    assert y.shape == (2, 24, 128) and dx.shape == (2, 24, 256)
    y_ref, vjp = jax.vjp(lambda x, a, b: kernels.nf4_lora_linear_reference(
        x, q, a, b, scale=0.5), x, a, b)
    dx_ref, da_ref, db_ref = vjp(dy)
    assert_close(y.reshape(48, 128), y_ref, jnp.bfloat16, "y")
    assert_close(dx.reshape(48, 256), dx_ref, jnp.bfloat16, "dx")
    assert_close(da, da_ref, jnp.bfloat16, "da")
    assert_close(db, db_ref, jnp.bfloat16, "db")


def test_weight_is_frozen():
    """The NF4 weight's float arrays get a zero gradient, like stop_gradient."""
    q = quantized(128, 256, 64, True)
    x, a, b, _ = make_inputs(16, 256, 128, 4, jnp.float32)
    grads = jax.grad(lambda nested, offset: kernels.nf4_lora_linear(
        x, dataclasses.replace(q, nested_absmax=nested, offset=offset), a, b,
        scale=SCALE, impl="xla").sum(), argnums=(0, 1))(q.nested_absmax, q.offset)
    assert not any(np.any(np.asarray(g)) for g in grads)
