"""jlora alone, for A/B of a code change: run it on each version (git checkout / worktree) and compare medians.

    python benchmarks/jlora_step.py --config 135m --dtype bf16     # the train step of train_step.py's config
    python benchmarks/jlora_step.py --config 135m --dtype bf16 --scan   # the same with scanned layers
    python benchmarks/jlora_step.py --attention 2048               # blockwise attention forward + backward
    python benchmarks/jlora_step.py --attention 256 --backend reference

Step: benchmarks/train_step.py's jlora side (its `make_jlora`: the config's random checkpoint written by
transformers and loaded, LoRA r=16 on the seven projections, the jitted, donated `make_train_step` over one
micro-batch); 2 warm-up steps (the first compiles), then `--steps` timed, median printed. Attention: `jlora.attention.attend(backend=--backend)` forward + backward (the
gradients of q, k, v) at T, batch 2, 3 kv heads x 3 queries each, head_dim 64, float32 and bf16, median of 5.
Nothing here runs PEFT: ratios against PEFT come from benchmarks/train_step.py.
"""
from __future__ import annotations

import os

os.environ.setdefault("JLORA_KEEP_HOST_MEMORY", "1")  # as `jlora train` runs (jlora/host_malloc.py)
import jlora  # noqa: F401  (before jax and numpy: see jlora/host_malloc.py)

import argparse
import statistics
import sys
import tempfile
import time

if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def step_seconds(config: str, dtype: str, steps: int, scan: bool = False) -> list[float]:
    """Wall seconds of every step, the first (compile + run) included."""
    import numpy as np
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    from train_step import CONFIGS, DTYPES, hf_config, make_jlora, write_checkpoint  # pylint: disable=import-outside-toplevel
    sys.path[:] = [p for p in sys.path if p != here]

    shape = argparse.Namespace(**CONFIGS[config])
    tokens = np.random.default_rng(0).integers(0, shape.vocab, (shape.batch, shape.seq + 1), dtype=np.int32)
    with tempfile.TemporaryDirectory() as ckpt:
        write_checkpoint(hf_config(shape), ckpt)
        run, _, _ = make_jlora(ckpt, DTYPES[dtype], tokens, shape, scan=scan)  # train_step.py's jlora step
    times = []
    for _ in range(steps + 2):
        began = time.perf_counter()
        run()
        times.append(time.perf_counter() - began)
    return times


def attention_seconds(seq: int, dtype, backend: str = "blockwise") -> list[float]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jlora.attention import attend
    r = np.random.RandomState(0)
    b, kv, g, d = 2, 3, 3, 64
    q = jnp.asarray(r.randn(b, seq, kv, g, d), dtype)
    k, v = (jnp.asarray(r.randn(b, seq, kv, d), dtype) for _ in "kv")
    seg = jnp.ones((b, seq), jnp.int32)
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v, seg, backend=backend, scale=0.125)
                                                     .astype(jnp.float32) ** 2), argnums=(0, 1, 2)))
    jax.block_until_ready(grad(q, k, v))
    times = []
    for _ in range(5):
        began = time.perf_counter()
        jax.block_until_ready(grad(q, k, v))
        times.append(time.perf_counter() - began)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="135m", help="benchmarks/train_step.py's CONFIGS key")
    p.add_argument("--dtype", default="bf16", choices=("f32", "bf16"))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--scan", action="store_true", help="scanned layers (`jlora train --scan-layers`)")
    p.add_argument("--attention", type=int, default=None, metavar="T",
                   help="time attention forward + backward at this length instead of the step")
    p.add_argument("--backend", default="blockwise", choices=("blockwise", "reference"),
                   help="the attention backend --attention times")
    args = p.parse_args(argv)
    load = f"load {os.getloadavg()[0]:.1f}, {os.cpu_count()} cpus"
    if args.attention:
        import jax.numpy as jnp
        for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
            ms = statistics.median(attention_seconds(args.attention, dtype, args.backend)) * 1e3
            print(f"{args.backend} attention fwd+bwd T={args.attention} {name}: {ms:.1f} ms ({load})")
        return 0
    times = step_seconds(args.config, args.dtype, args.steps, scan=args.scan)
    first, times = times[0], times[2:]
    layers = "scanned" if args.scan else "loop"
    print(f"jlora step {args.config} {args.dtype} {layers}: median {statistics.median(times):.3f} s "
          f"(steps {[round(x, 3) for x in times]}; first step {first:.1f} s; {load})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
