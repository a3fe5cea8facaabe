"""lora_linear_reference against float64 numpy, gradients from the closed forms.

    y  = x @ w + s * (x @ a) @ b
    dx = dy @ w.T + s * (dy @ b.T) @ a.T
    da = s * x.T @ (dy @ b.T)
    db = s * (x @ a).T @ dy
"""

import jax
import jax.numpy as jnp
import numpy as np


def test_reference_matches_float64_closed_forms():
    rng = np.random.default_rng(0)
    m, k, n, r, s = 24, 48, 40, 6, 1.7
    x, w = rng.standard_normal((m, k)), rng.standard_normal((k, n)) / np.sqrt(k)
    a, b = rng.standard_normal((k, r)) / np.sqrt(k), rng.standard_normal((r, n))
    dy = rng.standard_normal((m, n))

    y_want = x @ w + s * (x @ a) @ b
    dx_want = dy @ w.T + s * (dy @ b.T) @ a.T
    da_want = s * x.T @ (dy @ b.T)
    db_want = s * (x @ a).T @ dy

    from jlora.kernels import lora_linear_reference  # pylint: disable=import-outside-toplevel
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    y, vjp = jax.vjp(lambda x, a, b: lora_linear_reference(x, f32(w), a, b, scale=s),
                     f32(x), f32(a), f32(b))
    dx, da, db = vjp(f32(dy))
    for got, want in ((y, y_want), (dx, dx_want), (da, da_want), (db, db_want)):
        np.testing.assert_allclose(np.asarray(got, np.float64), want,
                                   rtol=1e-5, atol=1e-5 * np.abs(want).max())
