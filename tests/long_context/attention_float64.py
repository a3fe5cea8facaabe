"""The float64 attention every backend test compares with: numpy, forward and backward, written from the
definition (not from any backend).

    s = q k^T * scale;  s = cap * tanh(s / cap) under a soft cap;  p = softmax(s + mask);  out = p v
    ds = p * (dp - rowsum(dp * p)) * (1 - tanh^2 under a cap),  dp = dout v^T
    mask: k <= q, same segment id, q - k < window
"""
import numpy as np


def numpy_attention(q, k, v, seg, window, scale, dout, cap=None):
    """float64 forward and backward of softmax(softcap(q k^T scale) + mask) v, grouped kv heads."""
    q, k, v, dout = (np.asarray(a, np.float64) for a in (q, k, v, dout))
    t = q.shape[1]
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    mask = (j <= i) & ((i - j < window) if window else True)
    mask = mask[None] & (seg[:, :, None] == seg[:, None, :])
    s = np.einsum("btkgd,bskd->bkgts", q, k) * scale
    tanh = np.tanh(s / cap) if cap else None
    if cap:
        s = cap * tanh
    s = np.where(mask[:, None, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("bkgts,bskd->btkgd", p, v)
    dp = np.einsum("btkgd,bskd->bkgts", dout, v)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    if cap:
        ds = ds * (1 - tanh ** 2)
    return out, (np.einsum("bkgts,bskd->btkgd", ds, k) * scale, np.einsum("bkgts,btkgd->bskd", ds, q) * scale,
                 np.einsum("bkgts,btkgd->bskd", p, dout))
