"""NF4Tensor as a pytree: through jax.jit, as an nnx.Variable value, storage accounting."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jlora import nf4


class NF4Weight(nnx.Variable):
    """Frozen NF4 storage, not a Param (the way a layer would hold it)."""


def _q(double_quant=True):
    w = np.random.default_rng(0).standard_normal((16, 96)).astype(np.float32)
    return nf4.quantize(w, blocksize=32, double_quant=double_quant)


def test_leaves_are_the_arrays_and_aux_is_static():
    q = _q()
    leaves, treedef = jax.tree.flatten(q)
    assert [leaf.dtype for leaf in leaves] == [jnp.uint8, jnp.uint8, jnp.float32, jnp.float32, jnp.float32]
    assert [leaf.shape for leaf in leaves] == [(768,), (48,), (1,), (), (256,)]
    back = jax.tree.unflatten(treedef, leaves)
    assert (back.shape, back.blocksize, back.nested_blocksize, back.double_quant, back.dtype) == (
        (16, 96), 32, 256, True, "float32")
    plain = _q(double_quant=False)
    assert plain.absmax.dtype == jnp.float32 and plain.nested_code.shape == (0,)


def test_passes_through_jit():
    q = _q()
    x = jnp.ones((3, 96), jnp.float32)
    y = jax.jit(lambda q, x: x @ nf4.dequantize(q, jnp.float32).T)(q, x)
    np.testing.assert_allclose(y, x @ nf4.dequantize(q, jnp.float32).T, rtol=1e-6)
    same = jax.jit(lambda q: q)(q)
    assert isinstance(same, nf4.NF4Tensor) and same.shape == q.shape


def test_nnx_variable_value():
    class Frozen(nnx.Module):
        def __init__(self, q):
            self.weight = NF4Weight(q)

        def __call__(self, x):
            return x @ nf4.dequantize(self.weight.get_value(), jnp.float32).T

    module = Frozen(_q())
    x = jnp.ones((2, 96), jnp.float32)
    graphdef, frozen, rest = nnx.split(module, NF4Weight, ...)
    assert len(jax.tree.leaves(frozen)) == 5 and not jax.tree.leaves(rest)
    y = jax.jit(lambda state, x: nnx.merge(graphdef, state, rest)(x))(frozen, x)
    np.testing.assert_array_equal(y, module(x))
    abstract = nnx.eval_shape(lambda: Frozen(_q()))
    assert abstract.weight.get_value().codes.shape == (768,)


def test_nbytes_counts_every_array():
    q = _q()
    assert q.nbytes == 768 + 48 + 4 + 4 + 256 * 4
    assert q.size == 16 * 96
    assert q.bits_per_parameter == 8 * q.nbytes / q.size
    assert "shape=(16, 96)" in repr(q)
