"""Training-loop wall time: the overlapped loop (prefetch + metrics one step late) vs the synchronous one.

    python benchmarks/async_loop.py                  # the embedded default base, 40 steps, ~3 min on 2 cores
    python benchmarks/async_loop.py --steps 100 --seq-len 256

Both loops are `jlora.train.Trainer` on the same settings (`sync_loop=True` is the loop that reads every
step's loss before preparing the next batch); runs alternate sync, async, sync, async... (`--repeats`) in
one process with a persistent compilation cache, so only the first run compiles. The loop time of a run
is from the end of compilation (the "compiled in" log line) to the end of the step loop (the "loss a -> b"
line, after the final checkpoint and the adapter export, which both loops share). Printed: the median
loop time of each, the ratio sync / async (> 1: the overlapped loop is faster), and the host time per step
that overlapping hid, (sync - async) / steps; metrics.jsonl of the two is compared (everything but
tokens_per_sec must be equal).

On the CPU backend the "device" is the same few cores as the host, so there is little to overlap: this
measures that the overlapped loop is not slower and what host time per step it hides; an accelerator
is where the gap matters.
"""
from __future__ import annotations

import jlora  # noqa: F401  (before jax and numpy: see jlora/host_malloc.py)

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path


def run(out: Path, sync: bool, settings: dict) -> tuple[float, list[dict]]:
    from jlora.train.config import TrainConfig
    from jlora.train.trainer import Trainer

    marks = {}

    def log(*args, **_):
        text = str(args[0]) if args else ""
        if text.startswith("compiled in"):
            marks["start"] = time.perf_counter()
        elif text.lstrip().startswith("loss ") and "->" in text:
            marks["end"] = time.perf_counter()

    Trainer(TrainConfig(out=str(out), **settings), log=log, sync_loop=sync).run()
    records = [{k: v for k, v in json.loads(line).items() if k != "tokens_per_sec"}
               for line in (out / "metrics.jsonl").read_text().splitlines()]
    return marks["end"] - marks["start"], records


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    settings = dict(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, eval_every=0,
                    save_every=0, log_every=1, progress=False, dtype="float32", packing=True)
    times = {"sync": [], "async": []}
    with tempfile.TemporaryDirectory(prefix="jlora-async-") as tmp:
        jax.config.update("jax_compilation_cache_dir", str(Path(tmp) / "xla-cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        from jlora.default import build_default_base
        settings["model"] = str(build_default_base(Path(tmp) / "base"))
        from jlora.default import dataset_paths
        settings["data"] = str(dataset_paths()[0])
        records = {}
        for i in range(args.repeats):
            for mode in ("sync", "async"):
                seconds, records[mode] = run(Path(tmp) / f"{mode}{i}", mode == "sync", settings)
                times[mode].append(seconds)
                print(f"{mode:5s} run {i}: {seconds:.2f} s loop", flush=True)
    sync, overlapped = statistics.median(times["sync"]), statistics.median(times["async"])
    print(f"device: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}, "
          f"backend {jax.default_backend()}; default base, {args.steps} steps, batch {args.batch_size} x "
          f"{args.seq_len} tokens (packed), float32")
    print(f"loop seconds (median of {args.repeats}): sync {sync:.2f}, async {overlapped:.2f}; "
          f"sync / async = {sync / overlapped:.2f}x; host time hidden per step: "
          f"{(sync - overlapped) / args.steps * 1e3:.1f} ms")
    print(f"metrics.jsonl equal (all but tokens_per_sec): {records['sync'] == records['async']}")


if __name__ == "__main__":
    main()
