"""The best rank-k approximation of a LoRA update, as new LoRA factors (Eckart-Young).

    scale * B @ A = U S V^T   (spectrum.factored_svd)
    A' = sqrt(S_k) V_k^T      [k, in]
    B' = U_k sqrt(S_k) / scale_out   [out, k]

so scale_out * B' @ A' = U_k S_k V_k^T, the closest rank-k matrix to delta W in Frobenius and spectral
norm; the energy kept is sum(S_k^2) / sum(S^2). The square root splits the update evenly between the
factors. With k >= rank(delta W) nothing is lost.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jlora.ranks.spectrum import energy_kept, factored_svd


class Truncated(NamedTuple):
    a: np.ndarray        # [k, in] float64
    b: np.ndarray        # [out, k] float64
    energy_kept: float   # fraction of ||delta W||_F^2 kept
    singular_values: np.ndarray  # of the original delta W


def truncate(a: np.ndarray, b: np.ndarray, scale: float, k: int, *, scale_out: float | None = None) -> Truncated:
    """Factors of the best rank-k approximation of scale * b @ a, for a module whose scaling is scale_out."""
    if k < 1:
        raise ValueError(f"rank k must be at least 1, got {k}")
    scale_out = scale if scale_out is None else scale_out
    svd = factored_svd(a, b, scale)
    k_eff = min(k, len(svd.s))
    root = np.sqrt(svd.s[:k_eff])
    a_new = root[:, None] * svd.vt[:k_eff]
    b_new = svd.u[:, :k_eff] * (root / scale_out)[None, :]
    if k_eff < k:  # more rank asked than the matrix has: pad with zeros
        a_new = np.concatenate([a_new, np.zeros((k - k_eff, a_new.shape[1]))], axis=0)
        b_new = np.concatenate([b_new, np.zeros((b_new.shape[0], k - k_eff))], axis=1)
    return Truncated(a_new, b_new, energy_kept(svd.s, k), svd.s)


def pad_rank(a: np.ndarray, b: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """A [k, in] and B [out, k] with zero rows / columns up to rank r: the same B @ A."""
    k = a.shape[0]
    if k > r:
        raise ValueError(f"cannot pad rank {k} down to {r}")
    if k == r:
        return a, b
    return (np.concatenate([a, np.zeros((r - k, a.shape[1]), a.dtype)], axis=0),
            np.concatenate([b, np.zeros((b.shape[0], r - k), b.dtype)], axis=1))
