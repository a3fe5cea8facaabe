"""What each part of jlora's train step costs, measured by replacing that part with a cheap stand-in.

    python benchmarks/step_parts.py --config 135m --dtype bf16            # every part, 2 rounds
    python benchmarks/step_parts.py --config 135m --parts attention,head --rounds 3

Each run is benchmarks/jlora_step.py's step (train_step.py's config, LoRA r=16 on the seven projections,
`--steps` timed steps after two warm-ups, median) in a fresh process, with one part swapped out:

    full         nothing removed (the baseline; run before each part, in turns)
    attention    the attention core (scores, softmax, the weighted sum and their backward) -> q + k + v
    activation   SiLU -> identity
    norm         RMSNorm -> its weight times x (no mean square, no rsqrt)
    rope         the rotary embedding -> identity
    adapters     LoRA on q_proj only instead of all seven (what the other six adapters' rank-r work costs;
                 the frozen backward still crosses every layer)
    head         vocabulary 1,024 instead of the config's (what the head's two dots and the loss cost)

A part's cost is the full step's median minus the step's median without it. The stand-ins keep every shape,
so the rest of the step does the same work; the numbers are for reading where time goes, the losses are
meaningless. Why not a profile: a traced step (benchmarks/profile_step.py) runs ~1.6x slower than an
untraced one on XLA:CPU (~0.1 ms of tracing per thunk, ~7,400 thunks a 135m bf16 step) and charges that to the
small operations, so its shares mislead; this measures the step as it runs.
"""
from __future__ import annotations

import os

os.environ.setdefault("JLORA_KEEP_HOST_MEMORY", "1")  # as `jlora train` runs (jlora/host_malloc.py)
import jlora  # noqa: F401  (before jax and numpy: see jlora/host_malloc.py)

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

PARTS = ("attention", "activation", "norm", "rope", "adapters", "head")


def _remove(part: str, shape: dict) -> None:
    """Swaps `part` out in this process (before the model is built)."""
    import jlora.models.attention as attention  # pylint: disable=import-outside-toplevel
    import jlora.models.layers as layers  # pylint: disable=import-outside-toplevel
    if part == "attention":
        attention.attend = lambda q, k, v, segment_ids, **_: q + k[:, :, :, None, :] + v[:, :, :, None, :]
    elif part == "activation":
        for name in list(layers.ACTIVATION):
            layers.ACTIVATION[name] = lambda gate: gate
    elif part == "norm":
        layers.RMSNorm.__call__ = lambda self, x: x * self.weight[...].astype(x.dtype)
    elif part == "rope":
        attention.apply_rotary = lambda x, cos, sin: x
    elif part == "head":
        shape["vocab"] = 1024
    elif part not in ("full", "adapters"):
        raise ValueError(f"--part {part!r} is not one of full, {', '.join(PARTS)}")


def step_median(config: str, dtype: str, part: str, steps: int) -> float:
    import numpy as np  # pylint: disable=import-outside-toplevel
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    import train_step  # pylint: disable=import-outside-toplevel
    sys.path[:] = [p for p in sys.path if p != here]
    shape = dict(train_step.CONFIGS[config])
    _remove(part, shape)
    if part == "adapters":
        train_step.TARGETS = ["q_proj"]
    shape = argparse.Namespace(**shape)
    tokens = np.random.default_rng(0).integers(0, shape.vocab, (shape.batch, shape.seq + 1), dtype=np.int32)
    with tempfile.TemporaryDirectory() as ckpt:
        train_step.write_checkpoint(train_step.hf_config(shape), ckpt)
        run, _, _ = train_step.make_jlora(ckpt, train_step.DTYPES[dtype], tokens, shape)
    times = []
    for _ in range(steps + 2):
        began = time.perf_counter()
        run()
        times.append(time.perf_counter() - began)
    return statistics.median(times[2:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="135m", help="benchmarks/train_step.py's CONFIGS key")
    p.add_argument("--dtype", default="bf16", choices=("f32", "bf16"))
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--part", help=argparse.SUPPRESS)  # one run, in the child process
    args = p.parse_args(argv)
    if args.part:
        print(f"{step_median(args.config, args.dtype, args.part, args.steps):.6f}")
        return 0
    parts = [s for s in args.parts.split(",") if s]
    bad = [s for s in parts if s not in PARTS]
    if bad:
        p.error(f"--parts: {bad} not among {', '.join(PARTS)}")

    def child(part):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--config", args.config, "--dtype",
                              args.dtype, "--steps", str(args.steps), "--part", part],
                             capture_output=True, text=True, check=True).stdout
        return float(out.strip().splitlines()[-1])

    full, without = [], {s: [] for s in parts}
    for _ in range(args.rounds):
        for part in parts:
            full.append(child("full"))
            without[part].append(child(part))
    base = statistics.median(full)
    print(f"{args.config} {args.dtype}: full step {base:.3f} s (median of {len(full)} runs, "
          f"load {os.getloadavg()[0]:.1f}, {os.cpu_count()} cpus)")
    print("| part removed | step s | part costs s | share of the step |\n| --- | ---: | ---: | ---: |")
    for part in parts:
        s = statistics.median(without[part])
        print(f"| {part} | {s:.3f} | {base - s:.3f} | {100 * (base - s) / base:.0f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
