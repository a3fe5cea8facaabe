"""Factored SVD, effective rank and truncation against dense float64 NumPy SVDs."""
import numpy as np
import pytest

from jlora.ranks.spectrum import effective_rank, energy_kept, factored_svd
from jlora.ranks.truncate import pad_rank, truncate


def _factors(out, inp, r, seed=0):
    rng = np.random.RandomState(seed)
    return rng.randn(r, inp), rng.randn(out, r)


def _known(out, inp, s, seed=0):
    """A [r, in], B [out, r] with B @ A = U diag(s) V^T for random orthonormal U, V."""
    rng = np.random.RandomState(seed)
    u = np.linalg.qr(rng.randn(out, len(s)))[0]
    v = np.linalg.qr(rng.randn(inp, len(s)))[0]
    return (np.asarray(s)[:, None] * v.T), u


@pytest.mark.parametrize("out,inp,r", [(48, 32, 8), (32, 96, 16), (20, 24, 64), (7, 300, 3)])
def test_factored_svd_equals_dense(out, inp, r):
    a, b = _factors(out, inp, r)
    svd = factored_svd(a, b, 0.37)
    dense = 0.37 * b @ a
    want = np.linalg.svd(dense, compute_uv=False)[:len(svd.s)]
    np.testing.assert_allclose(svd.s, want, rtol=1e-10, atol=1e-10 * want[0])
    np.testing.assert_allclose((svd.u * svd.s) @ svd.vt, dense, atol=1e-10 * np.abs(dense).max())
    np.testing.assert_allclose(svd.u.T @ svd.u, np.eye(len(svd.s)), atol=1e-10)
    np.testing.assert_allclose(svd.vt @ svd.vt.T, np.eye(len(svd.s)), atol=1e-10)


def test_effective_rank_of_known_spectrum():
    # energies 16, 4, 1, 0.25 of 21.25: 20/21.25 = 94.1% >= 90% at k=2; 21/21.25 = 98.8% < 99% so k=4
    a, b = _known(40, 30, [4.0, 2.0, 1.0, 0.5])
    s = factored_svd(a, b).s
    np.testing.assert_allclose(s, [4, 2, 1, 0.5], rtol=1e-12)
    assert effective_rank(s, 0.90) == 2 and effective_rank(s, 0.99) == 4
    assert energy_kept(s, 2) == pytest.approx(20 / 21.25)


def test_zero_update_has_rank_zero():
    a, _ = _factors(16, 12, 4)
    s = factored_svd(a, np.zeros((16, 4))).s
    assert effective_rank(s, 0.9) == 0 and effective_rank(s, 0.99) == 0 and energy_kept(s, 1) == 1.0


def test_exact_low_rank_counts_its_rank():
    a, b = _known(64, 64, [3.0, 3.0, 3.0, 0.0, 0.0, 0.0])
    assert effective_rank(factored_svd(a, b).s, 0.99) == 3


@pytest.mark.parametrize("out,inp,r", [(48, 32, 8), (20, 24, 64)])
def test_truncation_to_own_rank_is_lossless(out, inp, r):
    a, b = _factors(out, inp, r, seed=1)
    t = truncate(a, b, 2.0, r, scale_out=0.5)
    np.testing.assert_allclose(0.5 * t.b @ t.a, 2.0 * b @ a, atol=1e-11 * np.abs(b @ a).max())
    assert t.energy_kept == pytest.approx(1.0, abs=1e-15)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_truncation_matches_numpy_svd(k):
    spectrum = [5.0, 3.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05]
    a, b = _known(64, 48, spectrum, seed=2)
    # scramble the factors so B @ A is the same but neither factor is orthogonal
    mix = np.random.RandomState(3).randn(8, 8)
    a, b = np.linalg.solve(mix, a), b @ mix
    scale = 0.75
    t = truncate(a, b, scale, k, scale_out=1.25)
    u, s, vt = np.linalg.svd(scale * b @ a)
    want = (u[:, :k] * s[:k]) @ vt[:k]
    np.testing.assert_allclose(1.25 * t.b @ t.a, want, atol=1e-11)
    np.testing.assert_allclose(np.linalg.norm(scale * b @ a - 1.25 * t.b @ t.a), np.sqrt(np.sum(s[k:] ** 2)),
                               rtol=1e-9)
    assert t.energy_kept == pytest.approx(np.sum(np.square(spectrum[:k])) / np.sum(np.square(spectrum)), rel=1e-12)
    assert t.a.shape == (k, 48) and t.b.shape == (64, k)


def test_pad_rank_keeps_product():
    a, b = _factors(10, 12, 3)
    pa, pb = pad_rank(a, b, 8)
    assert pa.shape == (8, 12) and pb.shape == (10, 8)
    np.testing.assert_array_equal(pb @ pa, b @ a)
