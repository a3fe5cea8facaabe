"""Per-op time of jlora's decode loop (XLA:CPU), from a jax.profiler trace: where a generated token's time goes.

    python benchmarks/profile_decode.py                  # batch 8, prompt 32, 64 new tokens, loop model
    python benchmarks/profile_decode.py --scan --new 128 # the scanned model (stacked cache)

The model is benchmarks/generate.py's (`--shape tiny`: a random Llama, hidden 256, 4 layers, 4 / 2 heads of
64, vocab 8192; `--shape 135m`: SmolLM2-135M's shape), float32, built by transformers and loaded by jlora. Prints the untraced time per decode step
((time of N new tokens - time of 2) / (N - 2), medians of 5) and, from one traced `generate_tokens` call,
the thunk time per step summed by source op and class (benchmarks/profile_step.py's classifier). Thunk
times include the tracer's own cost per instruction, so their sum exceeds the untraced step.
"""
from __future__ import annotations

import jlora  # noqa: F401  (before jax and numpy: see jlora/host_malloc.py)

import argparse
import collections
import glob
import gzip
import json
import os
import statistics
import sys
import tempfile
import time

if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--scan", action="store_true", help="load the layers scanned (the stacked cache path)")
    p.add_argument("--shape", default="tiny", help="benchmarks/generate.py's SHAPES: tiny or 135m")
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jlora.generate import decode
    from jlora.generate.sampler import SamplingConfig
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [here, here]  # each of the two scripts drops its own folder from sys.path when imported
    from generate import build  # pylint: disable=import-outside-toplevel
    from profile_step import classify, parse_hlo, source_of  # pylint: disable=import-outside-toplevel
    sys.path[:] = [x for x in sys.path if x != here]

    with tempfile.TemporaryDirectory() as tmp:
        vocab = build(tmp, shape=args.shape)
        model = jlora.load_hf(tmp, scan_layers=args.scan)
    prompts = np.random.RandomState(args.batch).randint(3, vocab, (args.batch, args.prompt)).tolist()

    def run(n):
        decode.generate_tokens(model, prompts, max_new_tokens=n)

    run(2), run(args.new)  # compile
    times = {n: [] for n in (2, args.new)}
    for _ in range(5):
        for n in times:
            began = time.perf_counter()
            run(n)
            times[n].append(time.perf_counter() - began)
    step_ms = (statistics.median(times[args.new]) - statistics.median(times[2])) / (args.new - 2) * 1e3

    statics = dict(sampling=SamplingConfig(), eos=(), pad=0)
    graphdef, state = nnx.split(model)
    prefill, loop = decode.jitted(graphdef)
    p_len = decode.bucket(args.prompt)
    carry = jax.eval_shape(lambda: prefill(state, jnp.zeros((args.batch, p_len), jnp.int32),
                                           jnp.zeros(args.batch, jnp.int32), jnp.zeros(args.batch, bool),
                                           jnp.int32(0), max_len=decode.cache_length(p_len, args.new), **statics))
    instrs, comps = parse_hlo(loop.lower(state, carry, jnp.int32(args.new), jnp.int32(0), **statics)
                              .compile().as_text())
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            run(args.new)
        with gzip.open(glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)[0]) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    per_source = collections.Counter()
    for e in events:
        name = e.get("name", "").split(":")[0].strip()
        if e.get("ph") == "X" and name in instrs:
            key = (source_of(name, instrs).replace("jit(_decode)/while/body/", ""), classify(name, instrs, comps))
            per_source[key] += e.get("dur", 0) / 1e3 / (args.new - 1)  # ms per decode step
    total = sum(per_source.values())
    print(f"decode, {args.shape} shape, batch {args.batch}, prompt {args.prompt}, {args.new} new tokens, "
          f"{'scanned' if args.scan else 'loop'} model: untraced {step_ms:.2f} ms/step "
          f"({args.batch / step_ms * 1e3:.0f} tokens/s); traced thunk time {total:.2f} ms/step; "
          f"{os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}")
    print("| source op | class | us/step | share |\n| --- | --- | ---: | ---: |")
    for (src, cls), ms in per_source.most_common(args.top):
        print(f"| {src} | {cls} | {ms * 1e3:.0f} | {100 * ms / total:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
