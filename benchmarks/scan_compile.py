"""Compile time of the LoRA train step for TPU v5e, scanned layers vs the layer loop, at two depths.

    python benchmarks/scan_compile.py [--preset llama-3.1-8b] [--layers 32 80] [--modes scan loop]

The model is `jlora plan`'s abstract LoRA model (bf16, r=16, all linear projections, remat "full"),
compiled by libtpu on this host for a v5e:2x2 topology with fsdp=4 (no TPU needed; jlora.plan.compile_step,
effort "fast"). Prints lower + compile seconds per (mode, depth) and the deep / shallow ratio per mode:
scanned layers should keep it near 1, the loop grows with depth.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")


def one(preset: str, layers: int, mode: str, *, batch: int, seq: int) -> tuple[float, float]:
    import jax
    from jlora.models.presets import preset_config
    from jlora.models.stacked import stack_layers
    from jlora.plan.arguments import abstract_step
    from jlora.plan.compile_step import compile_step
    from jlora.plan.hardware import parse_topology, tpu_devices
    from jlora.plan.model import abstract_lora_model, lora_config
    from jlora.train.sharding import make_mesh

    config = preset_config(preset)
    config = dataclasses.replace(config, num_hidden_layers=layers, layer_specs=config.layer_specs[:1] * layers)
    model = abstract_lora_model(config, lora=lora_config(16), dtype="bfloat16")
    model.remat = "full"
    if mode == "scan":
        stack_layers(model)
    mesh = make_mesh("fsdp=4", devices=tpu_devices(parse_topology("v5e:2x2")))
    with jax.set_mesh(mesh):
        step = abstract_step(model, mesh, batch_size=batch, seq_len=seq)
        result = compile_step(step, effort="fast")
    return result.lower_seconds, result.compile_seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--layers", type=int, nargs="+", default=[32, 80])
    ap.add_argument("--modes", nargs="+", default=["scan", "loop"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    a = ap.parse_args()
    t0 = time.time()
    for mode in a.modes:
        times = {}
        for n in a.layers:
            lower, comp = one(a.preset, n, mode, batch=a.batch, seq=a.seq)
            times[n] = lower + comp
            print(f"{mode:4s} {a.preset} x {n} layers: lower {lower:6.1f} s  compile {comp:6.1f} s", flush=True)
        lo, hi = min(a.layers), max(a.layers)
        print(f"{mode:4s} {hi}/{lo} layers: {times[hi] / times[lo]:.2f}x", flush=True)
    print(f"device: libtpu compile for v5e:2x2 on this host (CPU); wall {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
