"""LoRA linear forward + backward against the frozen linear, measured in one run.

    baseline:  y = x @ w,                       dx = dy @ w.T
    reference: lora_linear_reference + autodiff in (x, a, b)   (naive XLA)
    fused:     jlora.kernels.lora_linear(impl=...)            (custom backward)

Each is one jitted function returning y and the input/adapter gradients (never
dW: the base weight is frozen). Prints the device, median times and the ratio of
each LoRA variant to the baseline; REFERENCE.md puts the floor at ~1.01x for
r = 16 at these sizes.

  python benchmarks/kernels.py            # M=8192, K=N=4096 and 4096x14336
  python benchmarks/kernels.py --small    # a quick CPU-sized run
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from jlora import kernels

FULL = dict(m=8192, kn=((4096, 4096), (4096, 14336)), ranks=(8, 16, 64, 128))
SMALL = dict(m=512, kn=((512, 512), (512, 1792)), ranks=(8, 16, 64, 128))


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true",
                        help="small shapes for a quick CPU run")
    parser.add_argument("--impl", default="auto", choices=kernels.IMPLS)
    parser.add_argument("--dtype", default="bfloat16",
                        choices=("bfloat16", "float32"))
    parser.add_argument("--iters", type=int, default=None)
    args = parser.parse_args()

    cfg = SMALL if args.small else FULL
    iters = args.iters or 20
    dtype = jnp.dtype(args.dtype)
    device = jax.devices()[0]
    print(f"device: {device.platform} / {device.device_kind} "
          f"(jax {jax.__version__}); dtype {dtype.name}; impl={args.impl}; "
          f"median of {iters}, variants interleaved")
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


if __name__ == "__main__":
    main()
