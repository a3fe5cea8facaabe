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

The scales follow ggml's reference quantizers (quantize_row_q4_K_ref / quantize_row_q6_K_ref, which
llama-quantize runs without an importance matrix): per sub-block, a weighted least-squares search over
candidate scales (make_qkx2_quants for Q4_K: 21 steps, weights |x| + rms; make_qx_quants for Q6_K: 19
steps, weights x^2), then the sub-block scales quantized against the super-block maximum (6-bit for Q4_K,
int8 for Q6_K) and each value rounded to its nearest code under the quantized scales. Written from the
published algorithm and checked by dequantization (gguf's and transformers'), not against llama-quantize's
bytes: float32 sums in another order can round a borderline code differently.
"""
from __future__ import annotations

import numpy as np

QK_K = 256


def _f16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32).astype(np.float16)


def _blocks(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, np.float32)
    if rows.shape[-1] % QK_K:
        raise ValueError(f"k-quants need rows of a multiple of {QK_K} values, found {rows.shape[-1]}")
    return rows.reshape(-1, QK_K)


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den != 0, num / np.where(den != 0, den, 1), np.float32(0)).astype(np.float32)


def make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int = 15, rmin: float = -1.0, rdelta: float = 0.1,
                     nstep: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """ggml's make_qkx2_quants over rows of ``x`` [N, n]: (scale, -min) with x ~= scale * q + min,
    q in 0..nmax, min <= 0, minimising sum w (scale q + min - x)^2 over nstep + 1 candidate scales."""
    f = np.float32
    mn = np.minimum(x.min(1), 0).astype(f)
    mx = x.max(1)
    sum_w, sum_x = w.sum(1), (w * x).sum(1)
    span = (mx - mn).astype(f)
    iscale = _div(np.full_like(span, nmax), span)
    scale = _div(np.ones_like(span), iscale)
    q = np.clip(np.rint(iscale[:, None] * (x - mn[:, None])), 0, nmax)
    best = (w * (scale[:, None] * q + mn[:, None] - x) ** 2).sum(1)
    best_min = mn.copy()
    for step in range(nstep + 1):
        iscale = _div(np.full_like(span, f(rmin) + f(rdelta) * f(step) + f(nmax)), span)
        q = np.clip(np.rint(iscale[:, None] * (x - mn[:, None])), 0, nmax).astype(f)
        sum_l, sum_l2, sum_xl = (w * q).sum(1), (w * q * q).sum(1), (w * q * x).sum(1)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = _div(sum_w * sum_xl - sum_x * sum_l, det)
        this_min = _div(sum_l2 * sum_x - sum_l * sum_xl, det)
        positive = this_min > 0
        this_scale = np.where(positive, _div(sum_xl, sum_l2), this_scale)
        this_min = np.where(positive, f(0), this_min)
        err = (w * (this_scale[:, None] * q + this_min[:, None] - x) ** 2).sum(1)
        better = (det > 0) & (err < best)
        best, scale, best_min = np.where(better, err, best), np.where(better, this_scale, scale), \
            np.where(better, this_min, best_min)
    flat = span == 0
    return np.where(flat, f(0), scale).astype(f), (-np.where(flat, mn, best_min)).astype(f)


def make_qx_quants(x: np.ndarray, nmax: int = 32) -> np.ndarray:
    """ggml's make_qx_quants (rmse_type 1, weights x^2) over rows of ``x`` [N, n]: the signed scale with
    x ~= scale * q, q in -nmax..nmax-1, best of 19 candidates around -nmax / (the largest-magnitude x)."""
    f = np.float32
    big = np.take_along_axis(x, np.abs(x).argmax(1)[:, None], 1)[:, 0]
    w = x * x

    def fit(iscale):
        q = np.clip(np.rint(iscale[:, None] * x), -nmax, nmax - 1).astype(f)
        return (w * x * q).sum(1), (w * q * q).sum(1)

    sumlx, suml2 = fit(_div(np.full_like(big, -nmax), big))
    scale = _div(sumlx, suml2)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        sumlx, suml2 = fit(_div(np.full_like(big, -(f(nmax) + f(0.1) * f(step))), big))
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        new_scale = _div(sumlx, suml2)
        scale, best = np.where(better, new_scale, scale), np.where(better, new_scale * sumlx, best)
    return np.where(np.abs(big) < 1e-15, f(0), scale).astype(f)


def quantize_q4_k(rows: np.ndarray) -> np.ndarray:
    """uint8 Q4_K bytes of ``rows`` (last dim a multiple of 256): shape ``(..., cols / 256 * 144)``."""
    x = _blocks(rows).reshape(-1, 8, 32)
    n = x.shape[0]
    flat = x.reshape(-1, 32)
    rms = np.sqrt((flat * flat).sum(1) / 32)
    scales, mins = (a.reshape(n, 8) for a in make_qkx2_quants(flat, rms[:, None] + np.abs(flat)))
    max_scale, max_min = scales.max(1), mins.max(1)
    sc = np.minimum(63, np.rint(_div(np.float32(63), max_scale)[:, None] * scales)).astype(np.uint8)
    m = np.minimum(63, np.rint(_div(np.float32(63), max_min)[:, None] * mins)).astype(np.uint8)
    d, dmin = _f16(max_scale / 63), _f16(max_min / 63)
    step = d.astype(np.float32)[:, None] * sc
    offset = dmin.astype(np.float32)[:, None] * m
    q = np.clip(np.rint(_div(x + offset[..., None], step[..., None])), 0, 15).astype(np.uint8)
    scales_b = np.empty((n, 12), np.uint8)
    scales_b[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    scales_b[:, 4:8] = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    scales_b[:, 8:12] = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)
    out = np.concatenate([d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8), scales_b, qs], 1)
    return out.reshape(*np.shape(rows)[:-1], np.shape(rows)[-1] // QK_K * 144)


def quantize_q6_k(rows: np.ndarray) -> np.ndarray:
    """uint8 Q6_K bytes of ``rows`` (last dim a multiple of 256): shape ``(..., cols / 256 * 210)``."""
    x = _blocks(rows).reshape(-1, 16, 16)
    n = x.shape[0]
    scales = make_qx_quants(x.reshape(-1, 16)).reshape(n, 16)
    max_scale = np.take_along_axis(scales, np.abs(scales).argmax(1)[:, None], 1)[:, 0]
    iscale = _div(np.float32(-128), max_scale)
    d = _f16(_div(np.float32(1), iscale))
    sc = np.minimum(127, np.rint(iscale[:, None] * scales)).astype(np.int8)
    step = d.astype(np.float32)[:, None] * sc
    q = (np.clip(np.rint(_div(x, step[..., None])), -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 128)
    ql = (q[:, :, :64] & 15) | ((q[:, :, 64:] & 15) << 4)                      # [n, 2, 64]
    high = (q >> 4).reshape(-1, 2, 4, 32)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)   # [n, 2, 32]
    out = np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8),
                          d.reshape(-1, 1).view(np.uint8)], 1)
    return out.reshape(*np.shape(rows)[:-1], np.shape(rows)[-1] // QK_K * 210)
