"""impl="auto" picks Pallas only where it can run and the shapes tile."""

import jax
import jax.numpy as jnp

from jlora import kernels
from jlora.kernels import BlockSizes


def uses_pallas(m, k, n, r, dtype=jnp.float32, **kwargs):
    x = jnp.ones((m, k), dtype)
    w = jnp.ones((k, n), dtype)
    a = jnp.ones((k, r), jnp.float32)
    b = jnp.ones((r, n), jnp.float32)
    fn = lambda x, a, b: jax.vjp(
        lambda x, a, b: kernels.lora_linear(x, w, a, b, scale=1.0, **kwargs),
        x, a, b)[1](jnp.ones((m, n), dtype))
    return "pallas_call" in str(jax.make_jaxpr(fn)(x, a, b))


def test_auto_on_cpu_is_xla():
    assert jax.default_backend() == "cpu"
    assert not uses_pallas(64, 256, 256, 8)


def test_auto_with_interpret_is_pallas_when_shapes_tile():
    assert uses_pallas(64, 256, 256, 8, interpret=True)
    assert uses_pallas(40, 1024, 11008, 8, interpret=True)  # 11008 = 43 * 256
    assert not uses_pallas(64, 1000, 256, 8, interpret=True)  # K untileable
    assert not uses_pallas(64, 256, 256, 8, dtype=jnp.float16, interpret=True)
    blocks = BlockSizes(32, 32, 48, 32, 32, 32)  # 48 does not divide 256
    assert not uses_pallas(64, 256, 256, 8, interpret=True, block_sizes=blocks)


def test_explicit_impls():
    assert uses_pallas(64, 256, 256, 8, impl="pallas", interpret=True)
    assert not uses_pallas(64, 256, 256, 8, impl="xla", interpret=True)
