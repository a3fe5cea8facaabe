"""Compile time of the LoRA train step as `jlora plan` compiles it for TPU v5e: 8B vs 70B, scanned layers vs the loop.

    python benchmarks/compile_time.py                                   # scan: 8B and 70B, whole depth
    python benchmarks/compile_time.py --modes loop --layers 4 8         # loop: 4 and 8 layers, extrapolated
    python benchmarks/compile_time.py --presets llama-3.1-8b --modes scan loop --layers 32

Each case runs `jlora.plan.planner.Planner(...).run()` (the step `jlora plan` compiles: the trainer's step,
shardings and optimizer, splash attention, the chunked loss) in a fresh process, for one remat policy
("full"), no suggestion search, effort "fast" (jlora plan's default), NF4 base, LoRA r=16 on all linear
projections, batch 8 x 2048 on v5e:2x4 (fsdp=8) for both sizes. Printed per case: trace + lower seconds and
libtpu compile seconds (wall clock) and the CPU seconds of the process during them (user + system, all
threads: on a shared box the wall clock grows with the load, the CPU seconds much less).

`--layers N ...` overrides the depth (the preset's widths kept); without it the preset's own depth. The
loop's compile grows about linearly with depth, so `--modes loop --layers 4 8` extrapolates each preset to
its full depth: t(L) = t(4) + (L - 4) (t(8) - t(4)) / 4, and says so. The ratio line compares the largest
preset with the smallest: scanned layers should keep 70B / 8B near 1 (issue 12: <= 1.3x, each <= 60 s).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import resource
import subprocess
import sys
import time

if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # benchmarks/kernels.py must not shadow the `kernels` package bitsandbytes imports

ENV = {"JAX_PLATFORMS": "cpu", "TPU_SKIP_MDS_QUERY": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
       "TPU_WORKER_HOSTNAMES": "localhost"}


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def one(preset: str, mode: str, layers: int | None, *, topology: str, batch: int, seq: int) -> dict:
    """One compile in this process (run it in a fresh one): seconds and what the plan says."""
    from jlora.models.presets import preset_config
    from jlora.plan import planner as planner_module
    from jlora.plan.planner import Planner, PlanRequest

    config = preset_config(preset)
    if layers:  # the preset's widths at another depth (LayerSpec per layer kept from the first)
        config = dataclasses.replace(config, num_hidden_layers=layers, layer_specs=config.layer_specs[:1] * layers)
        planner_module.model_config = lambda _name: config
    request = PlanRequest(model=preset, topology=topology, batch_size=batch, seq_len=seq, quantize="nf4",
                          remat="full", suggest=False, scan_layers=mode == "scan")
    planner = Planner(request)
    cpu0, t0 = _cpu(), time.perf_counter()
    result = planner.run()
    cpu, wall = _cpu() - cpu0, time.perf_counter() - t0
    a = result.chosen
    return dict(preset=preset, mode=mode, layers=config.num_hidden_layers, source=a.source,
                lower_s=a.lower_seconds, compile_s=a.compile_seconds - a.lower_seconds, total_s=a.compile_seconds,
                cpu_s=cpu, wall_s=wall, bytes_per_chip=a.bytes_per_chip, fits=a.fits)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["llama-3.1-8b", "llama-3.1-70b"])
    ap.add_argument("--modes", nargs="+", default=["scan"], choices=["scan", "loop"])
    ap.add_argument("--layers", type=int, nargs="*", default=[], help="depths to compile (default: the preset's)")
    ap.add_argument("--topology", default="v5e:2x4")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: PRESET:MODE:LAYERS, print one JSON line
    a = ap.parse_args()
    if a.one:
        preset, mode, layers = a.one.split(":")
        print(json.dumps(one(preset, mode, int(layers) or None, topology=a.topology, batch=a.batch, seq=a.seq)))
        return
    from jlora.models.presets import preset_config

    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, libtpu compile for {a.topology} "
          f"on this host's CPU ({os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at start), "
          f"batch {a.batch} x {a.seq}, NF4, r=16 all-linear, remat full, effort fast", flush=True)
    full = {}
    for mode in a.modes:
        for preset in a.presets:
            times = {}
            for layers in a.layers or [0]:
                out = subprocess.run([sys.executable, __file__, "--one", f"{preset}:{mode}:{layers}",
                                      "--topology", a.topology, "--batch", str(a.batch), "--seq", str(a.seq)],
                                     env={**os.environ, **ENV}, capture_output=True, text=True)
                if out.returncode:
                    print(f"{mode} {preset} x {layers or 'all'} layers: failed: {out.stderr.strip()[-500:]}")
                    continue
                r = json.loads(out.stdout.strip().splitlines()[-1])
                times[r["layers"]] = r
                print(f"{mode:4s} {preset:14s} {r['layers']:3d} layers: lower {r['lower_s']:6.1f} s + compile "
                      f"{r['compile_s']:6.1f} s = {r['total_s']:6.1f} s wall, {r['cpu_s']:6.1f} CPU s "
                      f"({r['source']}, {r['bytes_per_chip'] / 2**30:.2f} GiB/chip)", flush=True)
            depth = preset_config(preset).num_hidden_layers
            if depth in times:
                full[mode, preset] = (times[depth]["total_s"], times[depth]["cpu_s"], "compiled")
            elif len(times) >= 2:
                (l0, r0), (l1, r1) = sorted(times.items())[:2]
                at = [x0 + (depth - l0) * (x1 - x0) / (l1 - l0)
                      for x0, x1 in ((r0["total_s"], r1["total_s"]), (r0["cpu_s"], r1["cpu_s"]))]
                full[mode, preset] = (*at, f"extrapolated from {l0} and {l1} layers")
                print(f"{mode:4s} {preset:14s} {depth:3d} layers: ~{at[0]:.0f} s wall, ~{at[1]:.0f} CPU s "
                      f"(extrapolated from {l0} and {l1} layers)", flush=True)
        got = [(p, full[mode, p]) for p in a.presets if (mode, p) in full]
        if len(got) >= 2:
            (p0, t0), (p1, t1) = got[0], got[-1]
            print(f"{mode:4s} {p1} / {p0}: {t1[0] / t0[0]:.2f}x wall, {t1[1] / t0[1]:.2f}x CPU", flush=True)
    print(f"# load average at end {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
