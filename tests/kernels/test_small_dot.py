"""The rank-r products (jlora.kernels.small_dot) against float64, and the forms XLA:CPU compiles them to.

Bounds are the float32 accumulation bound, elementwise: |got - want| <= (n + 2) 2^-24 (|lhs| @ |rhs|) for a
contraction of length n (n products and sums in float32, plus the two sums of the three bf16 parts). An
adapter rounded to bf16 once (what a bf16 rank-r path would do) misses it by orders of magnitude, which the
last numeric test shows.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora import kernels
from jlora.kernels.small_dot import _bf16_parts
from jlora.kernels.small_dot import thin_dot
from jlora.kernels.small_dot import thin_t_dot

M, K, R = 192, 160, 8
EPS32 = 2.0 ** -24


def _f64(v):
    return np.asarray(jnp.asarray(v, jnp.float32), np.float64)


def _operands(seed, wide_dtype):
    rng = np.random.default_rng(seed)
    wide = jnp.asarray(rng.standard_normal((M, K)), wide_dtype)
    # thin operands over several binades, as trained adapters and their gradients are
    thin = jnp.asarray(rng.standard_normal((K, R)) * 2.0 ** rng.integers(-12, 4, (K, R)), jnp.float32)
    rows = jnp.asarray(rng.standard_normal((M, R)) * 2.0 ** rng.integers(-12, 4, (M, R)), jnp.float32)
    return wide, thin, rows


def test_bf16_parts_sum_to_the_float32_value_exactly():
    rng = np.random.default_rng(0)
    u = rng.standard_normal((64, 48)) * 2.0 ** rng.integers(-100, 100, (64, 48))
    u[0, :4] = (0.0, -0.0, 1.0, -3.0)
    u = jnp.asarray(u, jnp.float32)
    parts = jax.jit(lambda v: _bf16_parts(v, axis=1))(u)
    assert parts.dtype == jnp.bfloat16 and parts.shape == (64, 3 * 48)
    first, second, third = (np.asarray(p, np.float64) for p in np.split(np.asarray(parts, np.float32), 3, axis=1))
    np.testing.assert_array_equal(first + second + third, _f64(u))


@pytest.mark.parametrize("wide_dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("seed", [0, 1])
def test_thin_dot_is_the_float32_product(wide_dtype, seed):
    x, u, _ = _operands(seed, wide_dtype)
    got = jax.jit(lambda x, u: thin_dot(x, u, jnp.float32, 0.5))(x, u)
    assert got.dtype == jnp.float32
    want = 0.5 * _f64(x) @ _f64(u)
    bound = (K + 2) * EPS32 * 0.5 * (np.abs(_f64(x)) @ np.abs(_f64(u)))
    assert np.all(np.abs(_f64(got) - want) <= bound), np.max(np.abs(_f64(got) - want) / bound)


@pytest.mark.parametrize("wide_dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("seed", [0, 1])
def test_thin_t_dot_is_the_float32_product(wide_dtype, seed):
    v, _, s = _operands(seed, wide_dtype)
    got = jax.jit(lambda s, v: thin_t_dot(s, v, jnp.float32).T)(s, v)  # .T as the LoRA wiring takes da
    assert got.dtype == jnp.float32 and got.shape == (K, R)
    want = _f64(v).T @ _f64(s)
    bound = (M + 2) * EPS32 * (np.abs(_f64(v)).T @ np.abs(_f64(s)))
    assert np.all(np.abs(_f64(got) - want) <= bound), np.max(np.abs(_f64(got) - want) / bound)


@pytest.mark.parametrize("wide_dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_a_contraction_of_one_rounds_once(wide_dtype):
    """With nothing to accumulate each entry is x * u rounded once to float32 (half an ulp): the three
    parts must hold all of u's 24 bits, or the error is 2^8 times that."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((M, 1)), wide_dtype)
    u = jnp.asarray(rng.standard_normal((1, R)), jnp.float32)
    s = jnp.asarray(rng.standard_normal((1, R)), jnp.float32)
    cases = ((jax.jit(lambda x, u: thin_dot(x, u, jnp.float32))(x, u), _f64(x) @ _f64(u)),
             (jax.jit(lambda s, v: thin_t_dot(s, v, jnp.float32).T)(s, x.T), _f64(x) @ _f64(s)))
    for got, want in cases:
        assert np.all(np.abs(_f64(got) - want) <= EPS32 * np.abs(want)), np.max(np.abs(_f64(got) - want) / np.abs(want))


def test_bound_rejects_a_bf16_rounded_adapter():
    """The bound above tells a float32 product from one with the adapter rounded to bf16."""
    x, u, _ = _operands(0, jnp.bfloat16)
    rounded = np.asarray(jnp.asarray(u, jnp.bfloat16), np.float64)
    want = _f64(x) @ _f64(u)
    bound = (K + 2) * EPS32 * (np.abs(_f64(x)) @ np.abs(_f64(u)))
    assert np.any(np.abs(_f64(x) @ rounded - want) > bound)


def _dots(hlo: str):
    """(result type, operand names, lhs contracting, rhs contracting) of each dot in compiled HLO text."""
    types = dict(re.findall(r"%?([\w.\-]+) = (\w+\[[\d,]*\])", hlo))
    found = []
    for line in hlo.splitlines():
        m = re.search(r"= (\w+\[[\d,]*\])\S* dot\(([^)]*)\).*lhs_contracting_dims=\{([\d,]*)\}, "
                      r"rhs_contracting_dims=\{([\d,]*)\}", line)
        if m:
            operands = [types.get(o.split()[-1].lstrip("%"), o) for o in m.group(2).split(", ")]
            found.append((m.group(1), operands, m.group(3), m.group(4)))
    return found


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the forms are XLA:CPU's")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_lora_backward_compiles_to_the_fast_forms_on_cpu(dtype):
    """No dot contracts both operands' leading axis; with a bf16 base no dot reads an [M, K] or [M, N] float32
    copy of x or dy (the wide operands stay bf16)."""
    m, k, n, r = 256, 96, 80, 8
    x = jnp.ones((m, k), dtype)
    w = jnp.ones((k, n), dtype)
    a, b = jnp.ones((k, r), jnp.float32), jnp.ones((r, n), jnp.float32)

    def fwd_bwd(x, w, a, b):
        y, pull = jax.vjp(lambda x, a, b: kernels.lora_linear(x, w, a, b, scale=2.0, impl="xla"), x, a, b)
        return pull(jnp.ones_like(y))

    dots = _dots(jax.jit(fwd_bwd).lower(x, w, a, b).compile().as_text())
    assert len(dots) >= 6, dots
    assert not [d for d in dots if d[2] == "0" and d[3] == "0"], dots
    if dtype == jnp.bfloat16:
        wide_f32 = {f"f32[{m},{k}]", f"f32[{m},{n}]"}
        assert not [d for d in dots if wide_f32 & set(d[1])], dots
