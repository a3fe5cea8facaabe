"""Kernel benchmarks, each against a baseline measured in the same run.

(a) LoRA linear forward + backward against the frozen linear:

    baseline:  y = x @ w,                       dx = dy @ w.T
    reference: lora_linear_reference + autodiff in (x, a, b)   (naive XLA)
    fused:     jlora.kernels.lora_linear(impl=...)            (custom backward)

Each is one jitted function returning y and the input/adapter gradients (never
dW: the base weight is frozen). Prints median times and the ratio of each LoRA
variant to the baseline; REFERENCE.md puts the floor at ~1.01x for r = 16.

(b) NF4 linear forward against the bf16 linear, K = N = 4096, M from decode
(1, 16) to training (4096, 16384) rows:

    bf16:      y = x @ w                                  (w [K, N] bfloat16)
    nf4:       nf4_lora_linear(x, q, a, b, impl=...)      (q = nf4.quantize(w.T), r = 16)
    nf4 (xla): nf4_lora_linear(..., impl="xla")           (dequantize W in XLA, then dot)

with the ratio to bf16 and each one's share of the measured matmul peak (a
large bf16 square matmul timed in the same run). At decode sizes the weight
bytes decide: the ideal NF4 speed-up is 16 / 4.127 = 3.9x (REFERENCE.md 5).

  python benchmarks/kernels.py            # full sizes (accelerator)
  python benchmarks/kernels.py --small    # a quick CPU-sized run
  python benchmarks/kernels.py --part b   # only (b)
"""

from __future__ import annotations

import jlora  # noqa: F401  (before jax and numpy: see jlora/host_malloc.py)

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from jlora import kernels
from jlora import nf4

FULL = dict(m=8192, kn=((4096, 4096), (4096, 14336)), ranks=(8, 16, 64, 128))
SMALL = dict(m=512, kn=((512, 512), (512, 1792)), ranks=(8, 16, 64, 128))
# Part (b): rows M at K = N, and the square matmul that measures the peak.
NF4_FULL = dict(rows=(1, 16, 256, 4096, 16384), kn=4096, peak=8192)
NF4_SMALL = dict(rows=(1, 16, 256, 4096), kn=1024, peak=2048)
NF4_RANK = 16


def median_ms(calls, iters: int, warmup: int = 2) -> list[float]:
    """Median wall time of each (fn, args) in ``calls``, run round-robin.

    Interleaving the variants makes their ratios robust to load that drifts over
    the run (a shared CPU, a throttling chip).
    """
    for fn, args in calls:
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))
    times = [[] for _ in calls]
    for _ in range(iters):
        for (fn, args), out in zip(calls, times):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            out.append(time.perf_counter() - start)
    return [1e3 * statistics.median(t) for t in times]


def make_steps(impl: str, scale: float):
    @jax.jit
    def baseline(x, w, dy):
        y, vjp = jax.vjp(lambda x: jnp.dot(x, w, preferred_element_type=jnp.float32)
                         .astype(x.dtype), x)
        return y, vjp(dy)

    def lora_step(fn):
        @jax.jit
        def step(x, w, a, b, dy):
            y, vjp = jax.vjp(lambda x, a, b: fn(x, w, a, b, scale=scale), x, a, b)
            return y, vjp(dy)
        return step

    fused = lora_step(lambda *args, scale: kernels.lora_linear(
        *args, scale=scale, impl=impl))
    reference = lora_step(kernels.lora_linear_reference)
    return baseline, reference, fused


def measure_peak(size: int, dtype, iters: int) -> float:
    """FLOP/s of a [size, size] @ [size, size] product in dtype (the 'peak')."""
    keys = jax.random.split(jax.random.key(1), 2)
    x = jax.random.normal(keys[0], (size, size), dtype)
    w = jax.random.normal(keys[1], (size, size), dtype)
    matmul = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32)
                     .astype(x.dtype))
    (t_ms,) = median_ms([(matmul, (x, w))], iters=iters)
    return 2 * size**3 / (t_ms * 1e-3)


def part_a(args, dtype, iters):
    cfg = SMALL if args.small else FULL
    print(f"(a) LoRA linear forward + backward vs the frozen linear; dtype "
          f"{dtype.name}; impl={args.impl}")
    header = (f"{'M':>6} {'K':>6} {'N':>6} {'r':>4} | {'base ms':>9} | "
              f"{'ref ms':>9} {'ref/base':>8} | {'fused ms':>9} {'fused/base':>10}")
    print(header)
    print("-" * len(header))
    m = cfg["m"]
    keys = jax.random.split(jax.random.key(0), 5)
    for k, n in cfg["kn"]:
        x = jax.random.normal(keys[0], (m, k), dtype)
        w = (jax.random.normal(keys[1], (k, n)) / k**0.5).astype(dtype)
        dy = jax.random.normal(keys[4], (m, n), dtype)
        for r in cfg["ranks"]:
            a = jax.random.normal(keys[2], (k, r), jnp.float32) / k**0.5
            b = jax.random.normal(keys[3], (r, n), jnp.float32) / r**0.5
            baseline, reference, fused = make_steps(args.impl, scale=2.0)
            t_base, t_ref, t_fused = median_ms(
                [(baseline, (x, w, dy)), (reference, (x, w, a, b, dy)),
                 (fused, (x, w, a, b, dy))], iters=iters)
            print(f"{m:>6} {k:>6} {n:>6} {r:>4} | {t_base:>9.2f} | "
                  f"{t_ref:>9.2f} {t_ref / t_base:>7.2f}x | "
                  f"{t_fused:>9.2f} {t_fused / t_base:>9.2f}x", flush=True)


def part_b(args, iters):
    cfg = NF4_SMALL if args.small else NF4_FULL
    dtype = jnp.dtype(jnp.bfloat16)
    kn = cfg["kn"]
    keys = jax.random.split(jax.random.key(2), 4)
    w = (jax.random.normal(keys[0], (kn, kn)) / kn**0.5).astype(dtype)  # [K, N]
    q = nf4.quantize(w.T, blocksize=64, double_quant=True)             # [N, K]
    a = jax.random.normal(keys[1], (kn, NF4_RANK), jnp.float32) / kn**0.5
    b = jax.random.normal(keys[2], (NF4_RANK, kn), jnp.float32) / NF4_RANK**0.5
    bf16_linear = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32)
                          .astype(x.dtype))
    nf4_fused = jax.jit(lambda x, q, a, b: kernels.nf4_lora_linear(
        x, q, a, b, scale=2.0, impl=args.impl))
    nf4_xla = jax.jit(lambda x, q, a, b: kernels.nf4_lora_linear(
        x, q, a, b, scale=2.0, impl="xla"))
    square = measure_peak(cfg["peak"], dtype, max(iters, 5))
    rows = []
    for m in cfg["rows"]:
        x = jax.random.normal(keys[3], (m, kn), dtype)
        rows.append((m, *median_ms([(bf16_linear, (x, w)), (nf4_fused, (x, q, a, b)),
                                    (nf4_xla, (x, q, a, b))], iters=iters)))
    # The peak: the best bf16 matmul rate seen in this run (the square product
    # or any bf16 row), so every share below is at most 100%.
    peak = max([square] + [2 * m * kn * kn / (t * 1e-3) for m, t, _, _ in rows])
    print(f"(b) NF4 linear forward vs the bf16 linear; K=N={kn}, r={NF4_RANK}, "
          f"blocksize 64, double quant; impl={args.impl}; measured bf16 matmul "
          f"peak {peak / 1e12:.3f} TFLOP/s (best of a {cfg['peak']}^3 product "
          f"and the bf16 rows)")
    header = (f"{'M':>6} | {'bf16 ms':>9} {'%peak':>6} | {'nf4 ms':>9} {'nf4/bf16':>8} "
              f"{'%peak':>6} | {'xla ms':>9} {'xla/bf16':>8} {'%peak':>6}")
    print(header)
    print("-" * len(header))
    for m, t_bf16, t_nf4, t_xla in rows:
        pct = lambda t: 100 * 2 * m * kn * kn / (t * 1e-3) / peak  # noqa: E731,B023
        print(f"{m:>6} | {t_bf16:>9.3f} {pct(t_bf16):>5.1f}% | {t_nf4:>9.3f} "
              f"{t_nf4 / t_bf16:>7.2f}x {pct(t_nf4):>5.1f}% | {t_xla:>9.3f} "
              f"{t_xla / t_bf16:>7.2f}x {pct(t_xla):>5.1f}%", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true",
                        help="small shapes for a quick CPU run")
    parser.add_argument("--part", default="all", choices=("a", "b", "all"))
    parser.add_argument("--impl", default="auto", choices=kernels.IMPLS)
    parser.add_argument("--dtype", default="bfloat16",
                        choices=("bfloat16", "float32"), help="part (a) only")
    parser.add_argument("--iters", type=int, default=None)
    args = parser.parse_args()

    iters = args.iters or 20
    device = jax.devices()[0]
    print(f"device: {device.platform} / {device.device_kind} "
          f"(jax {jax.__version__}); median of {iters}, variants interleaved")
    if args.part in ("a", "all"):
        part_a(args, jnp.dtype(args.dtype), iters)
    if args.part in ("b", "all"):
        part_b(args, iters)


if __name__ == "__main__":
    main()
