"""jlora.kernels.mixed_dot: the einsum and its two gradients against float64, and native bf16 dots."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora.kernels.mixed_dot import einsum
from jlora.kernels.mixed_dot import linear

SPECS = [  # (spec, x shape, y shape): the projection, the tied head, the two attention products
    ("mk,kn->mn", (24, 40), (40, 16)),
    ("mk,nk->mn", (24, 40), (16, 40)),
    ("btkgd,bskd->bkgts", (2, 6, 2, 3, 8), (2, 5, 2, 8)),
    ("bkgts,bskd->btkgd", (2, 2, 3, 6, 5), (2, 5, 2, 8)),
]


def _unit(dtype):
    return 2.0 ** -24 if dtype == jnp.float32 else 2.0 ** -8


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("spec,xs,ys", SPECS)
def test_value_and_grads_against_float64(spec, xs, ys, dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(xs), dtype)
    y = jnp.asarray(rng.standard_normal(ys), dtype)
    x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
    z64 = np.einsum(spec, x64, y64)
    dz = jnp.asarray(rng.standard_normal(z64.shape), dtype)
    dz64 = np.asarray(dz, np.float64)

    z, vjp = jax.vjp(lambda a, b: einsum(spec, a, b), x, y)
    dx, dy = vjp(dz)
    assert z.dtype == dx.dtype == dy.dtype == dtype

    ins, out = spec.split("->")
    xs_, ys_ = ins.split(",")
    for got, want, mag in (
            (z, z64, np.einsum(spec, np.abs(x64), np.abs(y64))),
            (dx, np.einsum(f"{out},{ys_}->{xs_}", dz64, y64), np.einsum(f"{out},{ys_}->{xs_}", np.abs(dz64),
                                                                         np.abs(y64))),
            (dy, np.einsum(f"{xs_},{out}->{ys_}", x64, dz64), np.einsum(f"{xs_},{out}->{ys_}", np.abs(x64),
                                                                         np.abs(dz64)))):
        # one rounding of the result (unit roundoff of the dtype) + float32 accumulation over <= 64 terms
        bound = _unit(dtype) * np.abs(want) + 64 * 2.0 ** -24 * mag
        assert np.all(np.abs(np.asarray(got, np.float64) - want) <= bound)


def test_bf16_dots_stay_bf16_in_both_passes():
    """Every dot of the forward and backward takes bf16 operands and accumulates in float32."""
    x = jnp.ones((2, 6, 2, 3, 8), jnp.bfloat16)
    y = jnp.ones((2, 5, 2, 8), jnp.bfloat16)
    text = jax.jit(jax.value_and_grad(lambda a, b: einsum("btkgd,bskd->bkgts", a, b).astype(jnp.float32).sum(),
                            argnums=(0, 1))).lower(x, y).as_text()
    dots = [line for line in text.splitlines() if "dot_general" in line]
    assert len(dots) == 3, dots
    for line in dots:
        types = line.rsplit(":", 1)[1]
        assert types.count("bf16") == 2 and "-> tensor<" in types and types.rstrip().endswith("xf32>"), line


def test_linear_folds_leading_axes_and_matches_einsum():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 8)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(2).standard_normal((8, 5)), jnp.float32)
    np.testing.assert_allclose(linear(x, w), np.einsum("btk,kn->btn", x, w), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(linear(x, w.T, transpose_w=True), np.einsum("btk,kn->btn", x, w),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", ["mk,kn", "...k,kn->...n", "mk,kn,nj->mj", "mkk,kn->mn", "mkj,kn->mn"])
def test_bad_spec_is_named(spec):
    with pytest.raises(ValueError, match="mixed_dot.einsum"):
        einsum(spec, jnp.ones((2, 2, 2)), jnp.ones((2, 2)))
