"""The KV cache: slots written where the index says, and decode attention over the cache equal to a float64
loop over the visible keys (left padding, sliding window, grouped heads, soft cap)."""
import jax.numpy as jnp
import numpy as np
import pytest

from jlora.generate.cache import KVCache
from jlora.models.config import ModelConfig

CONFIG = ModelConfig(vocab_size=10, hidden_size=16, intermediate_size=8, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8)


def _attention64(q, k, v, start, index, window, scale, cap):
    """One query per row at slot `index`: softmax over slots start_b..index within the window, in float64."""
    b, _, kvh, g, d = q.shape
    out = np.zeros((b, kvh, g, d))
    for r in range(b):
        slots = [j for j in range(start[r], index + 1) if window is None or index - j < window]
        for h in range(kvh):
            s = np.einsum("gd,jd->gj", q[r, 0, h].astype(np.float64), k[r, slots, h].astype(np.float64)) * scale
            if cap is not None:
                s = cap * np.tanh(s / cap)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[r, h] = p @ v[r, slots, h].astype(np.float64)
    return out[:, None]


@pytest.mark.parametrize("window,cap", [(None, None), (3, None), (None, 2.0)])
def test_decode_attention_equals_float64_loop(window, cap):
    rng = np.random.RandomState(0)
    b, max_len, index = 3, 12, 7
    start = np.array([0, 2, 6])
    cache = KVCache.create(CONFIG, b, max_len, start)
    keys = rng.randn(b, index, 2, 8).astype(np.float32)
    vals = rng.randn(b, index, 2, 8).astype(np.float32)
    cache = cache.at_layer(1).write(jnp.asarray(keys), jnp.asarray(vals)).advanced(index)
    q = rng.randn(b, 1, 2, 2, 8).astype(np.float32)
    k1, v1 = rng.randn(b, 1, 2, 8).astype(np.float32), rng.randn(b, 1, 2, 8).astype(np.float32)
    # garbage in the padding slots must not be seen
    out, new = cache.at_layer(1).attend(jnp.asarray(q), jnp.asarray(k1), jnp.asarray(v1), None,
                                        sliding_window=window, scale=0.3, logit_softcap=cap)
    all_k, all_v = np.concatenate([keys, k1], 1), np.concatenate([vals, v1], 1)
    want = _attention64(q, all_k, all_v, start, index, window, 0.3, cap)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(new.k[1, :, index]), k1[:, 0])
    assert not np.asarray(new.k[0]).any() and not np.asarray(new.k[2]).any(), "other layers must stay untouched"


def test_cache_memory_and_positions():
    cache = KVCache.create(CONFIG, 2, 64, [0, 5], dtype=jnp.bfloat16)
    assert cache.k.shape == (3, 2, 64, 2, 8)
    assert cache.nbytes == 2 * 3 * 2 * 64 * 2 * 8 * 2
    np.testing.assert_array_equal(cache.advanced(6).positions(2), [[6, 7], [1, 2]])
    with pytest.raises(ValueError, match="start"):
        KVCache.create(CONFIG, 2, 64, [0])
