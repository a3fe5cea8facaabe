"""lora_linear (Pallas in interpret mode, and XLA) against lora_linear_reference.

Forward output and jax.vjp gradients in x, a and b over a generated table of
shapes: every (M, r) pair, M in 40, 64, 136 (40 and 136 leave a ragged last row
block) and r in 1, 8, 64, 256, cycling through (K, N) pairs and block sizes.
The dtypes form a checkerboard over the (M, r) grid, so every M and every r runs
in both float32 and bfloat16 on the Pallas path, and XLA takes the other colour
(interpret mode costs ~1 s per compiled kernel, so the full cross is too slow).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora import kernels
from jlora.kernels import BlockSizes

SCALE = 2.0

# max |got - want| <= TOL * max(1, max |want|), per compute dtype.
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}

B32 = BlockSizes(32, 32, 32, 32, 32, 32)
B64 = BlockSizes(64, 64, 64, 64, 64, 64)
MIXED = BlockSizes(block_m=32, block_n=64, block_k=32,
                   block_m_dx=64, block_k_dx=32, block_n_dx=64)
KN = ((64, 128), (128, 64), (128, 128))
BLOCKS = (B32, B64, MIXED)
DTYPES = (jnp.float32, jnp.bfloat16)


def _cases():
    """(impl, dtype, M, K, N, r, blocks) for each (M, r) cell and each impl."""
    cases = []
    cells = itertools.product(enumerate((40, 64, 136)),
                              enumerate((1, 8, 64, 256)))
    for i, ((mi, m), (ri, r)) in enumerate(cells):
        k, n = KN[i % len(KN)]
        blocks = BLOCKS[(i // len(KN)) % len(BLOCKS)]
        for j, impl in enumerate(("pallas", "xla")):
            dtype = DTYPES[(mi + ri + j) % 2]
            cases.append((impl, dtype, m, k, n, r, blocks))
    return cases


CASES = _cases()


def _case_id(case):
    impl, dtype, m, k, n, r, b = case
    name = "f32" if dtype == jnp.float32 else "bf16"
    return f"{impl}-{name}-m{m}-k{k}-n{n}-r{r}-b{b.block_m}x{b.block_n}"


def make_inputs(m, k, n, r, dtype, seed=0):
    """O(1) activations and outputs; adapters kept in float32 like a trainer."""
    kx, kw, ka, kb, kd = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(kx, (m, k)).astype(dtype)
    w = (jax.random.normal(kw, (k, n)) / np.sqrt(k)).astype(dtype)
    a = jax.random.normal(ka, (k, r)) / np.sqrt(k)
    b = jax.random.normal(kb, (r, n)) / np.sqrt(r)
    dy = jax.random.normal(kd, (m, n)).astype(dtype)
    return x, w, a, b, dy


def assert_close(got, want, dtype, what):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, what
    err = np.abs(got - want).max()
    bound = TOL[dtype] * max(1.0, np.abs(want).max())
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def vjp_of(fn, x, w, a, b, dy):
    """y and the (x, a, b) cotangents, as one jitted computation (one compile)."""
    @jax.jit
    def run(x, w, a, b, dy):
        y, vjp = jax.vjp(lambda x, a, b: fn(x, w, a, b, scale=SCALE), x, a, b)
        return y, vjp(dy)
    return run(x, w, a, b, dy)


@pytest.mark.parametrize("impl,dtype,m,k,n,r,blocks", CASES,
                         ids=[_case_id(c) for c in CASES])
def test_matches_reference(impl, dtype, m, k, n, r, blocks):
    x, w, a, b, dy = make_inputs(m, k, n, r, dtype)

    def fused(x, w, a, b, *, scale):
        return kernels.lora_linear(x, w, a, b, scale=scale, impl=impl,
                                   interpret=True, block_sizes=blocks)

    y, (dx, da, db) = vjp_of(fused, x, w, a, b, dy)
    y_ref, (dx_ref, da_ref, db_ref) = vjp_of(kernels.lora_linear_reference,
                                             x, w, a, b, dy)
    assert y.dtype == x.dtype and dx.dtype == x.dtype
    assert da.dtype == a.dtype and db.dtype == b.dtype
    assert_close(y, y_ref, dtype, "y")
    assert_close(dx, dx_ref, dtype, "dx")
    assert_close(da, da_ref, dtype, "da")
    assert_close(db, db_ref, dtype, "db")


def test_forward_without_vjp_and_leading_dims():
    """[B, T, K] input, plain call (no vjp), auto-picked blocks in interpret mode."""
    x, w, a, b, _ = make_inputs(48, 128, 256, 16, jnp.float32)
    x3 = x.reshape(2, 24, 128)
    y = kernels.lora_linear(x3, w, a, b, scale=SCALE, interpret=True)
    assert y.shape == (2, 24, 256)
    want = kernels.lora_linear_reference(x, w, a, b, scale=SCALE)
    assert_close(y.reshape(48, 256), want, jnp.float32, "y")


def test_frozen_weight_gets_zero_gradient():
    """w behaves as if stop_gradient'ed: dW is a zero, never the real x.T @ dy."""
    x, w, a, b, _ = make_inputs(32, 64, 64, 4, jnp.float32)
    for impl in ("pallas", "xla"):
        dw = jax.grad(lambda w: kernels.lora_linear(
            x, w, a, b, scale=SCALE, impl=impl, interpret=True).sum())(w)
        assert dw.shape == w.shape and not np.any(np.asarray(dw))


def test_traced_scale_under_jit():
    x, w, a, b, dy = make_inputs(32, 64, 64, 8, jnp.float32)

    @jax.jit
    def step(scale, a, b):
        y, vjp = jax.vjp(lambda a, b: kernels.lora_linear(
            x, w, a, b, scale=scale, impl="pallas", interpret=True), a, b)
        return y, vjp(dy)

    for scale in (0.5, 4.0):
        y, (da, db) = step(jnp.float32(scale), a, b)
        y_ref, vjp_ref = jax.vjp(lambda a, b: kernels.lora_linear_reference(
            x, w, a, b, scale=scale), a, b)
        da_ref, db_ref = vjp_ref(dy)
        assert_close(y, y_ref, jnp.float32, f"y (scale={scale})")
        assert_close(da, da_ref, jnp.float32, f"da (scale={scale})")
        assert_close(db, db_ref, jnp.float32, f"db (scale={scale})")


def test_zero_b_is_the_base_linear():
    """With PEFT's init (B = 0) the layer is exactly the frozen linear."""
    x, w, a, b, _ = make_inputs(64, 64, 128, 8, jnp.bfloat16)
    y = kernels.lora_linear(x, w, a, jnp.zeros_like(b), scale=SCALE,
                            impl="pallas", interpret=True, block_sizes=B32)
    base = jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
    np.testing.assert_array_equal(np.asarray(y, np.float32),
                                  np.asarray(base, np.float32))
