"""impl="auto" picks Pallas only where it can run and the shapes tile."""

import functools

import jax
import jax.numpy as jnp
import pytest

from jlora import kernels
from jlora import nf4
from jlora.kernels import BlockSizes
from jlora.kernels import dispatch


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


@functools.cache
def _nf4_weight(n, k, blocksize=64):
    return nf4.quantize(jnp.ones((n, k), jnp.bfloat16), blocksize=blocksize)


def nf4_uses_pallas(m, k, n, r, dtype=jnp.float32, blocksize=64, **kwargs):
    q = _nf4_weight(n, k, blocksize)
    x = jnp.ones((m, k), dtype)
    a = jnp.ones((k, r), jnp.float32)
    b = jnp.ones((r, n), jnp.float32)
    fn = lambda x, a, b: jax.vjp(
        lambda x, a, b: kernels.nf4_lora_linear(x, q, a, b, scale=1.0, **kwargs),
        x, a, b)[1](jnp.ones((m, n), dtype))
    return str(jax.make_jaxpr(fn)(x, a, b)).count("pallas_call")


def test_nf4_auto():
    assert nf4_uses_pallas(64, 256, 256, 8) == 0  # CPU: XLA
    assert nf4_uses_pallas(64, 256, 256, 8, interpret=True) == 2  # y and dx
    assert nf4_uses_pallas(64, 11008 // 43 * 3, 128, 8, interpret=True) == 2  # K=768
    assert nf4_uses_pallas(64, 320, 256, 8, interpret=True) == 0  # K untileable
    assert nf4_uses_pallas(64, 256, 256, 8, blocksize=512, interpret=True) == 0
    assert nf4_uses_pallas(64, 256, 256, 8, dtype=jnp.float16, interpret=True) == 0
    assert nf4_uses_pallas(64, 256, 256, 8, impl="xla", interpret=True) == 0


def test_auto_never_picks_unmeasured_triton(monkeypatch):
    """On GPU auto stays on XLA even when jax-triton imports: Triton is opt-in until timed on a GPU."""
    monkeypatch.setattr(dispatch.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    assert dispatch.auto_impl(interpret=False) == "xla"
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    assert dispatch.auto_impl(interpret=False) == "xla"
    assert dispatch.auto_impl(interpret=True) == "pallas"
    monkeypatch.setattr(dispatch.jax, "default_backend", lambda: "cpu")
    assert dispatch.auto_impl(interpret=False) == "xla"
    monkeypatch.setattr(dispatch.jax, "default_backend", lambda: "tpu")
    assert dispatch.auto_impl(interpret=False) == "pallas"


@pytest.mark.skipif(dispatch.triton_available(), reason="jax-triton is installed")
def test_explicit_triton_without_jax_triton_says_what_to_install():
    x = jnp.ones((8, 256))
    with pytest.raises(ImportError, match="impl='triton' needs triton and jax-triton"):
        kernels.lora_linear(x, jnp.ones((256, 128)), jnp.ones((256, 4)),
                            jnp.ones((4, 128)), scale=1.0, impl="triton")
    with pytest.raises(ImportError, match="impl='triton' needs triton and jax-triton"):
        kernels.nf4_lora_linear(x, _nf4_weight(128, 256), jnp.ones((256, 4)),
                                jnp.ones((4, 128)), scale=1.0, impl="triton")
