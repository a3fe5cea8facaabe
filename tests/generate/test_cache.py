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


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("window,cap", [(None, None), (3, None), (None, 2.0)])
def test_decode_attention_equals_float64_loop(window, cap, per_layer):
    rng = np.random.RandomState(0)
    b, max_len, index = 3, 12, 7
    start = np.array([0, 2, 6])
    cache = KVCache.create(CONFIG, b, max_len, start, per_layer=per_layer)
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
    np.testing.assert_array_equal(np.asarray(new.k[1])[:, :, :, index], k1[:, 0])   # [b, kv_heads, d, max_len]
    np.testing.assert_array_equal(np.asarray(new.v[1])[:, :, index], v1[:, 0])      # [b, kv_heads, max_len, d]
    assert not np.asarray(new.k[0]).any() and not np.asarray(new.k[2]).any(), "other layers must stay untouched"


def test_two_queries_at_once_equal_float64_loop():
    """attend_cached with t = 2 queries (slots index and index + 1) folds (t, group) into one row axis: each
    query still sees only its own causal prefix."""
    rng = np.random.RandomState(1)
    b, max_len, index = 2, 10, 5
    start = np.array([0, 3])
    keys = rng.randn(b, index + 2, 2, 8).astype(np.float32)
    vals = rng.randn(b, index + 2, 2, 8).astype(np.float32)
    cache = KVCache.create(CONFIG, b, max_len, start, per_layer=True).at_layer(0)
    cache = cache.write(jnp.asarray(keys), jnp.asarray(vals)).advanced(index)   # index: the first query's slot
    q = rng.randn(b, 2, 2, 2, 8).astype(np.float32)
    out = np.asarray(cache.at_layer(0).attend_cached(jnp.asarray(q), sliding_window=None, scale=0.3))
    for j in range(2):
        want = _attention64(q[:, j:j + 1], keys, vals, start, index + j, None, 0.3, None)
        np.testing.assert_allclose(out[:, j:j + 1], want, rtol=1e-5, atol=1e-5)


def test_cache_memory_and_positions():
    cache = KVCache.create(CONFIG, 2, 64, [0, 5], dtype=jnp.bfloat16)
    assert cache.k.shape == (3, 2, 2, 8, 64) and cache.v.shape == (3, 2, 2, 64, 8)
    assert cache.nbytes == 2 * 3 * 2 * 64 * 2 * 8 * 2
    per_layer = KVCache.create(CONFIG, 2, 64, [0, 5], dtype=jnp.bfloat16, per_layer=True)
    assert [x.shape for x in per_layer.k] == [(2, 2, 8, 64)] * 3 and per_layer.nbytes == cache.nbytes
    np.testing.assert_array_equal(cache.advanced(6).positions(2), [[6, 7], [1, 2]])
    with pytest.raises(ValueError, match="start"):
        KVCache.create(CONFIG, 2, 64, [0])
