"""The dot-rate ceiling of a train step: XLA:CPU's matmul against torch's at the step's own shapes.

    python benchmarks/dot_rate.py --config 135m --dtype f32,bf16
    XLA_FLAGS=--xla_cpu_experimental_onednn_fusion_type=dot python benchmarks/dot_rate.py --config 1b

For each projection of the config (benchmarks/train_step.py's CONFIGS: q, k, v, o, gate, up, down and
the tied head) and each dtype, times the two products that a LoRA step runs per frozen weight W [K, N]
on M = batch * seq rows:

    forward   y  = x [M, K] @ W [K, N]
    input grad dx = dy [M, N] @ W^T                     (W contracted on its output axis, no copy)

XLA: one jitted `lax.dot_general` with float32 accumulation (`preferred_element_type`, which keeps a
bf16 x bf16 dot native on XLA:CPU). torch: `torch.nn.functional.linear` with W in torch's [N, K]
orientation for the forward and `dy @ W` for the input gradient, as PEFT's frozen Linear does. The
two are timed alternately, so load from other processes hits both alike; each time is the best of --reps
(on a loaded machine the best repetition is the closest to the idle rate; a median mixes in the load).

Printed per shape: ms and GFLOP/s of each (2 M K N FLOPs), and per dtype the step's projection and
head dots summed, weighted by how many times one step runs them (layers x (forward + input grad); the
head: forward + input grad once). A square 2048^3 product gives the peak each library reaches.
"""
from __future__ import annotations

import jlora  # noqa: F401  (before jax and numpy: see jlora/host_malloc.py)

import argparse
import os
import sys
import time

if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)


def shapes(c):
    """(name, K, N, uses per step) for one config: each frozen projection and the head."""
    h, i, hd = c["hidden"], c["intermediate"], c["hidden"] // c["heads"]
    kv = c["kv_heads"] * hd
    n = c["layers"]
    return [("q/o", h, h, 2 * n), ("k/v", h, kv, 2 * n), ("gate/up", h, i, 2 * n), ("down", i, h, n),
            ("head", h, c["vocab"], 1)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="135m")
    ap.add_argument("--dtype", default="f32,bf16")
    ap.add_argument("--reps", type=int, default=9)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from train_step import CONFIGS, cpu_flags, cpu_model  # pylint: disable=import-outside-toplevel
    sys.path.pop(0)
    torch.set_num_threads(os.cpu_count())
    c = CONFIGS[args.config]
    m = c["batch"] * c["seq"]
    print(f"{args.config}: M = {m} rows; jax {jax.__version__}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); cpu {cpu_model()}, flags {cpu_flags()}; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; load {os.getloadavg()[0]:.1f}")

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    fwd = jax.jit(lambda x, w: jax.lax.dot_general(x, w, (((1,), (0,)), ((), ())),
                                                   preferred_element_type=jnp.float32))
    dxf = jax.jit(lambda g, w: jax.lax.dot_general(g, w, (((1,), (1,)), ((), ())),
                                                   preferred_element_type=jnp.float32))
    for name in args.dtype.split(","):
        jdt, tdt = {"f32": (jnp.float32, torch.float32), "bf16": (jnp.bfloat16, torch.bfloat16)}[name]
        rows = [("square", 2048, 2048, 2048, 0)] + [(s, m, k, n, u) for s, k, n, u in shapes(c)]
        print(f"\n{name}: | shape | M x K x N | uses/step | op | XLA ms | torch ms | XLA GFLOP/s | "
              f"torch GFLOP/s | XLA / torch time |")
        tot = {"xla": 0.0, "torch": 0.0}
        flops_step = 0.0
        for label, mm, k, n, uses in rows:
            rng = np.random.default_rng(0)
            x = rng.standard_normal((mm, k), np.float32)
            w = rng.standard_normal((k, n), np.float32) / np.sqrt(k)
            g = rng.standard_normal((mm, n), np.float32)
            jx, jw, jg = (jnp.asarray(a, jdt) for a in (x, w, g))
            tx, tg = torch.from_numpy(x).to(tdt), torch.from_numpy(g).to(tdt)
            tw = torch.from_numpy(np.ascontiguousarray(w.T)).to(tdt)  # torch Linear weight [N, K]
            ops = (("fwd", lambda: fwd(jx, jw).block_until_ready(),
                    lambda: torch.nn.functional.linear(tx, tw)),
                   ("dx", lambda: dxf(jg, jw).block_until_ready(), lambda: tg @ tw))
            for op, jf, tf in ops:
                jf(), tf()
                js, ts = [], []
                with torch.no_grad():
                    for _ in range(args.reps):
                        js.append(timed(jf))
                        ts.append(timed(tf))
                j, t = min(js), min(ts)
                fl = 2.0 * mm * k * n
                print(f"| {label} | {mm} x {k} x {n} | {uses} | {op} | {j * 1e3:.2f} | {t * 1e3:.2f} | "
                      f"{fl / j / 1e9:.0f} | {fl / t / 1e9:.0f} | {j / t:.2f} |")
                tot["xla"] += uses * j
                tot["torch"] += uses * t
                flops_step += uses * fl
        print(f"{name} step's frozen dots ({flops_step / 1e9:.0f} GFLOP): XLA {tot['xla']:.3f} s "
              f"({flops_step / tot['xla'] / 1e9:.0f} GFLOP/s), torch {tot['torch']:.3f} s "
              f"({flops_step / tot['torch'] / 1e9:.0f} GFLOP/s); load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
