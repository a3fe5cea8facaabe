"""Q4_K and Q6_K quantization in numpy (gguf-py dequantizes k-quants but has no quantizer for them).

Blocks of 256 values (one "super-block" per 256 columns of a row), byte layouts as ggml's block_q4_K and
block_q6_K, so gguf.quants.dequantize, transformers and llama.cpp read them:

    Q4_K (144 bytes): d f16 | dmin f16 | scales[12] | qs[128]
        8 sub-blocks of 32:  x ~= d * sc_j * q - dmin * m_j,   q in 0..15, sc_j, m_j 6-bit
        scales: bytes 0-3 sc_0..3 | (sc_4..7 >> 4) << 6;  4-7 m_0..3 | (m_4..7 >> 4) << 6;
                bytes 8-11 (sc_4..7 & 15) | (m_4..7 & 15) << 4
        qs: 4 chunks of 32 bytes; chunk c holds sub-block 2c in the low nibbles and 2c+1 in the high
    Q6_K (210 bytes): ql[128] | qh[64] | scales[16] int8 | d f16
        16 sub-blocks of 16:  x ~= d * sc_j * (q - 32),   q in 0..63
        per half h of 128 values: ql[64h + b] = low4(q[b]) | low4(q[b + 64]) << 4   (b < 64)
                                  qh[32h + l] = sum_s high2(q[32s + l]) << 2s       (l < 32, s < 4)

The scales are chosen directly (no iterative search like ggml's make_qkx2_quants, so the bytes differ
from llama-quantize's, not the format): a sub-block's step is its range / 15 (Q4_K, with the minimum
folded into ``dmin * m``) or max |x| / 31 (Q6_K), the 6/8-bit scale codes are rounded up so that no
value falls outside the code range, and each value is rounded to its nearest code. Error per value:
at most half a step, plus (Q4_K) one ``dmin`` from rounding the minimum's code up.
"""
from __future__ import annotations

import numpy as np

QK_K = 256


def _f16_at_least(x: np.ndarray) -> np.ndarray:
    """float16 of x (>= 0), rounded up: the code scales built on it never overflow their code range."""
    h = x.astype(np.float16)
    return np.where(h.astype(np.float32) < x, np.nextafter(h, np.float16(np.inf)), h)


def _blocks(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, np.float32)
    if rows.shape[-1] % QK_K:
        raise ValueError(f"k-quants need rows of a multiple of {QK_K} values, found {rows.shape[-1]}")
    return rows.reshape(-1, QK_K)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), 0)


def quantize_q4_k(rows: np.ndarray) -> np.ndarray:
    """uint8 Q4_K bytes of ``rows`` (last dim a multiple of 256): shape ``(..., cols / 256 * 144)``."""
    x = _blocks(rows).reshape(-1, 8, 32)
    lo = np.minimum(x.min(-1), 0)
    scale = (x.max(-1) - lo) / 15
    d = _f16_at_least(scale.max(-1) / 63)
    dmin = _f16_at_least((-lo).max(-1) / 63)
    sc = np.clip(np.ceil(_ratio(scale, d.astype(np.float32)[:, None])), 0, 63).astype(np.uint8)
    m = np.clip(np.ceil(_ratio(-lo, dmin.astype(np.float32)[:, None])), 0, 63).astype(np.uint8)
    step = d.astype(np.float32)[:, None] * sc
    offset = dmin.astype(np.float32)[:, None] * m
    q = np.clip(np.rint(_ratio(x + offset[..., None], step[..., None])), 0, 15).astype(np.uint8)
    scales = np.empty((x.shape[0], 12), np.uint8)
    scales[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)
    out = np.concatenate([d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8), scales, qs], 1)
    return out.reshape(*np.shape(rows)[:-1], np.shape(rows)[-1] // QK_K * 144)


def quantize_q6_k(rows: np.ndarray) -> np.ndarray:
    """uint8 Q6_K bytes of ``rows`` (last dim a multiple of 256): shape ``(..., cols / 256 * 210)``."""
    x = _blocks(rows).reshape(-1, 16, 16)
    scale = np.abs(x).max(-1) / 31
    d = _f16_at_least(scale.max(-1) / 127)
    sc = np.clip(np.ceil(_ratio(scale, d.astype(np.float32)[:, None])), 0, 127).astype(np.int8)
    step = d.astype(np.float32)[:, None] * sc
    q = (np.clip(np.rint(_ratio(x, step[..., None])), -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 128)
    ql = (q[:, :, :64] & 15) | ((q[:, :, 64:] & 15) << 4)                      # [n, 2, 64]
    high = (q >> 4).reshape(-1, 2, 4, 32)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)   # [n, 2, 32]
    out = np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8),
                          d.reshape(-1, 1).view(np.uint8)], 1)
    return out.reshape(*np.shape(rows)[:-1], np.shape(rows)[-1] // QK_K * 210)
