"""The cudnn backend: where jax.nn.dot_product_attention cannot express the call it falls back to blockwise
and says so once; on a CUDA GPU (skipped elsewhere) it equals a float64 attention on unpacked and packed
batches. A backend unavailable here is an error naming the available ones."""
import warnings

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jlora.attention import attend
from jlora.attention.cudnn import _warn_once, cudnn_attention

from tests.long_context.attention_float64 import numpy_attention

gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU (cuDNN flash attention)")


def _inputs(b, t, kv, g, d, seg, dtype, seed=0):
    rng = np.random.RandomState(seed)
    arrays = [rng.randn(b, t, kv, g, d), rng.randn(b, t, kv, d), rng.randn(b, t, kv, d), rng.randn(b, t, kv, g, d)]
    arrays = [jnp.asarray(a, dtype) for a in arrays]
    return arrays, jnp.asarray(seg, jnp.int32)


@pytest.mark.parametrize("dtype, cap, reason", [
    (jnp.float32, None, "takes bfloat16 or float16, got float32"),
    (jnp.bfloat16, 30.0, "a logit soft cap is not expressible"),
])
def test_inexpressible_calls_fall_back_and_warn_once(dtype, cap, reason):
    """float32 and a soft cap: blockwise computes it (equal to float64 within the dtype's rounding), with one
    warning naming why, not one per call."""
    _warn_once.cache_clear()
    b, t, kv, g, d = 2, 20, 2, 2, 8
    seg = np.array([[1] * 12 + [2] * 8, [4] * 20])
    (q, k, v, dout), seg_j = _inputs(b, t, kv, g, d, seg, dtype)
    want, _ = numpy_attention(*(np.asarray(a, np.float64) for a in (q, k, v)), seg, 6, 0.4,
                              np.asarray(dout, np.float64), cap)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # two traces (a new function each time), one warning
            out = jax.jit(lambda *a: cudnn_attention(*a, sliding_window=6, scale=0.4, logit_softcap=cap))(
                q, k, v, seg_j)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and reason in messages[0] and "'blockwise'" in messages[0], messages
    eps = float(jnp.finfo(dtype).eps)
    assert np.abs(np.asarray(out, np.float64) - want).max() <= 16 * (d + t) * eps * np.abs(want).max()


def test_cudnn_is_an_error_off_gpu():
    if jax.default_backend() == "gpu":
        pytest.skip("cudnn is available here")
    x = jnp.zeros((1, 8, 1, 1, 8), jnp.bfloat16)
    with pytest.raises(ValueError, match="'cudnn' is not available on cpu .*available here: auto, blockwise"):
        attend(x, x[:, :, :, 0], x[:, :, :, 0], jnp.ones((1, 8), jnp.int32), backend="cudnn", scale=1.0)


@gpu
@pytest.mark.parametrize("window", [None, 64])
def test_cudnn_equals_float64_on_gpu(window):
    """bf16, 4 kv heads x 2, head_dim 64, T 256: one batch of unpacked rows (cuDNN computes it) and one
    with packed rows (blockwise computes it, by the run-time cond); value and grads within bf16 roundings."""
    b, t, kv, g, d = 2, 256, 4, 2, 64
    for seg in (np.ones((b, t), np.int32), np.array([[1] * 100 + [2] * 156, [3] * 200 + [0] * 56])):
        (q, k, v, dout), seg_j = _inputs(b, t, kv, g, d, seg, jnp.bfloat16, seed=1)
        want, grads = numpy_attention(*(np.asarray(a, np.float64) for a in (q, k, v)), seg, window, d ** -0.5,
                                      np.asarray(dout, np.float64))
        f = jax.jit(lambda q, k, v: attend(q, k, v, seg_j, backend="cudnn", sliding_window=window, scale=d ** -0.5))
        out, vjp = jax.vjp(f, q, k, v)
        for name, x, ref in zip(["out", "dq", "dk", "dv"], [out, *vjp(dout)], [want, *grads]):
            assert np.abs(np.asarray(x, np.float64) - ref).max() <= 8 * 2.0 ** -8 * np.abs(ref).max(), name
