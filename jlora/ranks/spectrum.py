"""Singular values of delta W = scale * B @ A without forming the [out, in] matrix.

With B [out, r] and A [r, in], QR-factor B = Qb Rb and A^T = Qa Ra (thin, r columns), then

    delta W = Qb (scale * Rb Ra^T) Qa^T,   scale * Rb Ra^T = Uc S Vc^T   (an r x r SVD)
            = (Qb Uc) S (Qa Vc)^T

so U = Qb Uc, V = Qa Vc and S are delta W's thin SVD at O((in + out) r^2) cost, in float64.

Effective rank at energy e: the fewest singular values whose squares sum to at least e of
||delta W||_F^2 (0 for an all-zero update, e.g. B at its zero initialisation).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

ENERGIES = (0.90, 0.99)


class SVD(NamedTuple):
    u: np.ndarray    # [out, r], orthonormal columns
    s: np.ndarray    # [r], descending, >= 0
    vt: np.ndarray   # [r, in], orthonormal rows


def factored_svd(a: np.ndarray, b: np.ndarray, scale: float = 1.0) -> SVD:
    """Thin SVD of scale * b @ a (b [out, r], a [r, in]) in float64 via two QRs and an r x r SVD."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise ValueError(f"expected a [r, in] and b [out, r] of one rank r, got a {a.shape} and b {b.shape}")
    qb, rb = np.linalg.qr(b)       # [out, k], [k, r], k = min(out, r)
    qa, ra = np.linalg.qr(a.T)     # [in, k'], [k', r], k' = min(in, r)
    uc, s, vct = np.linalg.svd(scale * rb @ ra.T, full_matrices=False)
    return SVD(qb @ uc, s, vct @ qa.T)


def energy(s: np.ndarray) -> np.ndarray:
    """Cumulative fraction of ||delta W||_F^2 in the first k singular values, k = 1..len(s)."""
    sq = np.square(np.asarray(s, np.float64))
    total = sq.sum()
    return np.cumsum(sq) / total if total > 0 else np.zeros_like(sq)


def effective_rank(s: np.ndarray, fraction: float) -> int:
    """Fewest singular values that hold `fraction` of the energy (0 when delta W is zero)."""
    s = np.asarray(s, np.float64)
    if not np.any(s > 0):
        return 0
    # a tiny tolerance so that exactly-rank-k updates count as k despite float64 rounding
    return int(np.searchsorted(energy(s), fraction * (1 - 1e-12)) + 1)


def energy_kept(s: np.ndarray, k: int) -> float:
    """Fraction of ||delta W||_F^2 that its best rank-k approximation keeps (1.0 for a zero update)."""
    s = np.asarray(s, np.float64)
    total = float(np.square(s).sum())
    return 1.0 if total == 0 else float(np.square(s[:k]).sum() / total)
