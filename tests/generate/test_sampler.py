"""The sampler against transformers' logits processors and a float64 distribution."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy import stats
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from jlora.generate.sampler import SamplingConfig, filter_logits, first_max_index, next_tokens, penalize


def _logits(b=4, v=50, seed=0):
    return np.random.RandomState(seed).randn(b, v).astype(np.float32) * 3


@pytest.mark.parametrize("kw", [dict(temperature=0.7), dict(temperature=1.3, top_k=5), dict(temperature=1.0, top_p=0.6),
                                dict(temperature=0.5, top_k=10, top_p=0.9), dict(temperature=2.0, top_p=0.05)])
def test_filter_equals_transformers_warpers(kw):
    logits = _logits()
    scores = torch.tensor(logits)
    for warper in [TemperatureLogitsWarper(kw["temperature"])] + \
            ([TopKLogitsWarper(kw["top_k"])] if "top_k" in kw else []) + \
            ([TopPLogitsWarper(kw["top_p"])] if "top_p" in kw else []):
        scores = warper(None, scores)
    want = scores.numpy()
    got = np.asarray(filter_logits(jnp.asarray(logits), SamplingConfig(**kw)))
    assert (np.isinf(got) == np.isinf(want)).all(), kw
    kept = ~np.isinf(want)
    np.testing.assert_allclose(got[kept], want[kept], rtol=1e-6)
    assert kept.sum(-1).min() >= 1


def test_repetition_penalty_equals_transformers():
    logits = _logits(2, 20)
    ids = np.array([[3, 5, 5, 7], [0, 19, 2, 1]])
    want = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor(ids), torch.tensor(logits)).numpy()
    seen = np.zeros_like(logits, bool)
    np.put_along_axis(seen, ids, True, axis=1)
    np.testing.assert_allclose(np.asarray(penalize(jnp.asarray(logits), jnp.asarray(seen), 1.3)), want, rtol=1e-6)


def test_top_k_1_is_greedy_and_seeds_reproduce():
    logits = jnp.asarray(_logits(8, 100))
    seen = jnp.zeros(logits.shape, bool)
    greedy = next_tokens(logits, seen, 0, SamplingConfig())
    np.testing.assert_array_equal(greedy, np.argmax(np.asarray(logits), -1))
    top1 = SamplingConfig(temperature=1.5, top_k=1, seed=5)
    np.testing.assert_array_equal(next_tokens(logits, seen, 3, top1), greedy)
    hot = SamplingConfig(temperature=5.0, seed=1)
    a = [np.asarray(next_tokens(logits, seen, s, hot)) for s in range(4)]
    b = [np.asarray(next_tokens(logits, seen, s, hot)) for s in range(4)]
    c = [np.asarray(next_tokens(logits, seen, s, SamplingConfig(temperature=5.0, seed=2))) for s in range(4)]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c), "another seed must give other samples"


def _expected64(logits, temperature, top_p):
    """The float64 distribution after temperature and top-p (smallest top set whose mass reaches top_p)."""
    z = np.asarray(logits, np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    before = np.cumsum(p[order]) - p[order]
    keep = np.zeros_like(p, bool)
    keep[order[before < top_p]] = True
    q = np.where(keep, p, 0)
    return q / q.sum()


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.6, 1.0), (1.4, 0.75)])
def test_sample_frequencies_match_float64_distribution(temperature, top_p):
    logits = np.array([1.0, 0.5, 0.2, -0.3, -1.0, 0.8, -2.0, 0.0], np.float32)
    want = _expected64(logits, temperature, top_p)
    n = 20000
    config = SamplingConfig(temperature=temperature, top_p=top_p, seed=11)
    draw = jax.jit(jax.vmap(lambda s: next_tokens(jnp.asarray(logits)[None], jnp.zeros((1, 8), bool), s, config)[0]))
    counts = np.bincount(np.asarray(draw(jnp.arange(n))), minlength=8)
    assert (counts[want == 0] == 0).all(), f"filtered tokens were drawn: {counts} vs {want}"
    support = want > 0
    chi2 = (((counts - n * want) ** 2)[support] / (n * want[support])).sum()
    assert chi2 < stats.chi2.ppf(1 - 1e-6, support.sum() - 1), (counts / n, want)
    if top_p < 1:
        assert 0 < (~support).sum() < 7, "top_p must remove some but not all tokens here"


@pytest.mark.parametrize("kw,match", [(dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
                                      (dict(temperature=-0.1), "temperature"), (dict(top_k=-1), "top_k"),
                                      (dict(repetition_penalty=0.0), "repetition_penalty")])
def test_bad_settings_name_themselves(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kw)


def test_greedy_pick_is_numpy_argmax_first_on_ties():
    """first_max_index (greedy's pick) equals np.argmax, which returns the first of tied maxima; a NaN row still
    gives an index inside the vocabulary."""
    rng = np.random.RandomState(0)
    logits = rng.randn(6, 300).astype(np.float32)
    logits[1, [7, 150, 299]] = 9.0                    # three-way tie: the first wins
    logits[2] = 0.0                                   # all equal: index 0
    logits[3, -1] = 5.0                               # the max at the last index
    logits[4, :] = np.round(logits[4, :])             # many ties at the top value
    picked = np.asarray(jax.jit(first_max_index)(jnp.asarray(logits)))
    np.testing.assert_array_equal(picked, np.argmax(logits, axis=-1))
    logits[5, 10] = np.nan
    picked = np.asarray(first_max_index(jnp.asarray(logits)))
    assert 0 <= picked[5] < 300
