"""Memory of one LoRA train step on a bf16 base vs an NF4 base (QLoRA), and the NF4 budget of 8B and 70B.

    python benchmarks/memory.py            # ~5 minutes on 2 CPU cores
    python benchmarks/memory.py --quick    # a smaller model

Part 1, measured on this machine. One Llama config; random weights written once as a bfloat16
safetensors checkpoint. Each side runs in its own process: `jlora.load_hf(ckpt, dtype="bfloat16")`,
or the same with `quantize="nf4"` (each projection quantized as it streams in), then LoRA r=16 on the
7 projections, AdamW over the adapters, and the jitted, donated step `jlora train` runs
(`make_train_step`), 3 steps. For each side:

- step peak (XLA): arguments + outputs + temporaries - donated, from the compiled step's
  `memory_analysis()`: what must be resident while one step runs;
- process peak RSS (VmHWM) over load + compile + steps, the RSS after imports alone, and the RSS
  once the model is loaded and split;
- the model's bytes by kind (`jlora.memory_report`).

Printed with the ratio NF4 / bf16, and the device.

Part 2, abstract (`nnx.eval_shape`, nothing allocated). The 8B and 70B presets with LoRA r=16 on all
linear layers, bf16 vs NF4 base: bytes by kind, and per device on an 8-device fsdp mesh under
jlora's sharding rules (kernels over fsdp, NF4 codes and absmax along their flat axis, adapters and
AdamW moments following their parameters). Activations are not included.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import types

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MiB = 2**20
GiB = 2**30


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_now() -> int:
    return _status("VmRSS")


def rss_peak() -> int:
    """This process' high-water resident set. VmHWM, not ru_maxrss: ru_maxrss carries the parent's peak
    across fork + exec."""
    return _status("VmHWM")


def hf_config(args) -> dict:
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=args.hidden,
                intermediate_size=args.intermediate, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                num_key_value_heads=args.kv_heads, vocab_size=args.vocab, max_position_embeddings=2048,
                rms_norm_eps=1e-5, tie_word_embeddings=False)


def write_checkpoint(args, out_dir):
    import jlora
    model = jlora.init_random(jlora.LlamaConfig.from_hf_dict(hf_config(args)), seed=0)
    jlora.save_merged(model, out_dir, dtype="bfloat16")


def worker(args) -> dict:
    """One side, in its own process: load, build the step, compile, run; print JSON."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import jlora
    from jlora.train.optimizer import learning_rate_schedule, make_optimizer
    from jlora.train.state import SplitModel
    from jlora.train.step import make_train_step

    jnp.zeros(1).block_until_ready()  # start the runtime before taking the baseline
    baseline = rss_peak()
    quantize = "nf4" if args.worker == "nf4" else None
    model = jlora.load_hf(args.ckpt, dtype="bfloat16", quantize=quantize)
    model = jlora.get_peft_model(model, jlora.LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS),
                                 rngs=nnx.Rngs(0))
    split = SplitModel.of(model)
    params, frozen = split.params(), split.frozen
    tx = make_optimizer(learning_rate_schedule(2e-4, 100, 0))
    opt = tx.init(params)
    report = jlora.memory_report(model, opt)
    del model
    after_load = rss_now()

    b, t = args.batch, args.seq
    ids = np.random.default_rng(0).integers(0, args.vocab, (1, b, t + 1), dtype=np.int32)
    batch = {"inputs": jnp.asarray(ids[..., :-1]), "targets": jnp.asarray(ids[..., 1:]),
             "loss_mask": jnp.ones((1, b, t), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (1, b, t)),
             "segment_ids": jnp.ones((1, b, t), jnp.int32)}
    key = jax.random.key(0)
    compiled = jax.jit(make_train_step(split, tx), donate_argnums=(0, 1)).lower(
        params, opt, frozen, batch, key, jnp.asarray(0, jnp.int32)).compile()
    ma = compiled.memory_analysis()
    step_peak = (ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
                 - ma.alias_size_in_bytes)
    losses = []
    for i in range(args.steps):
        params, opt, m = compiled(params, opt, frozen, batch, key, jnp.asarray(i, jnp.int32))
        losses.append(float(m["loss"]))
    return {"step_peak": step_peak, "arguments": ma.argument_size_in_bytes, "temporaries": ma.temp_size_in_bytes,
            "rss_baseline": baseline, "rss_after_load": after_load, "rss_peak": rss_peak(),
            "report": str(report), "losses": losses}


def run_side(side: str, ckpt: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--ckpt", ckpt, "--batch", str(args.batch),
           "--seq", str(args.seq), "--steps", str(args.steps), "--vocab", str(args.vocab)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{side} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- part 2: abstract presets ----------------------------------------------------------------------

def per_device_bytes(model, mesh_shape: dict) -> dict:
    """Bytes per device of the frozen base and the adapters (+ AdamW moments) under jlora's sharding rules."""
    import jax
    import numpy as np
    from flax import nnx

    from jlora.lora_layer import LoRAParam
    from jlora.nf4 import NF4Tensor
    from jlora.train.sharding import nf4_specs, param_spec
    from jlora.train.state import path_name

    mesh = types.SimpleNamespace(shape=mesh_shape)

    def split_ways(spec) -> int:
        axes = [a for entry in spec if entry for a in (entry if isinstance(entry, tuple) else (entry,))]
        return math.prod(mesh_shape[a] for a in axes)

    def nbytes(x) -> int:
        return math.prod(x.shape) * np.dtype(x.dtype).itemsize

    base = adapters = 0
    for path, var in nnx.to_flat_state(nnx.state(model)):
        value, name = var.get_value(), path_name(path)
        if isinstance(value, NF4Tensor):
            specs = nf4_specs(value, mesh)
            base += sum(nbytes(a) // split_ways(s) for a, s in zip(jax.tree.leaves(value), jax.tree.leaves(
                specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))))
        elif hasattr(value, "shape"):
            share = nbytes(value) // split_ways(param_spec(name, value.shape, mesh))
            if isinstance(var, LoRAParam):
                adapters += share
            elif isinstance(var, nnx.Param):
                base += share
    return {"base": base, "adapters": adapters, "adam": 2 * adapters}


def abstract_rows(names, devices: int):
    from flax import nnx

    import jlora

    rows = []
    for name in names:
        cfg = jlora.preset_config(name)
        for kind in ("bf16", "nf4"):
            def build():
                model = jlora.init_random(cfg, dtype="bfloat16")
                if kind == "nf4":
                    jlora.quantize_model(model)
                return jlora.get_peft_model(model, jlora.LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS),
                                            rngs=nnx.Rngs(0))
            model = nnx.eval_shape(build)
            report = jlora.memory_report(model)
            shard = per_device_bytes(model, {"data": 1, "fsdp": devices, "tensor": 1})
            rows.append((name, kind, report, 2 * report.adapters, shard))
    return rows


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def device_line() -> str:
    import jax
    d = jax.devices()[0]
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"jax {jax.__version__} on {d.platform} ({d.device_kind}); cpu: {cpu_model()}, {os.cpu_count()} cores; "
            f"load average {load}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smaller model")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--devices", type=int, default=8, help="fsdp mesh size for the per-device bytes of part 2")
    ap.add_argument("--presets", default="llama-3.1-8b,llama-3.1-70b")
    ap.add_argument("--worker", choices=["bf16", "nf4"], help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.quick:
        args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate, args.vocab = 512, 4, 8, 2, 1408, 8192

    n_params = args.layers * (args.hidden * (2 * args.hidden + 2 * args.hidden * args.kv_heads // args.heads)
                              + 3 * args.hidden * args.intermediate) + 2 * args.vocab * args.hidden
    print(f"Llama: hidden {args.hidden}, {args.layers} layers, {args.heads} heads / {args.kv_heads} kv, intermediate "
          f"{args.intermediate}, vocab {args.vocab} ({n_params / 1e6:.0f}M params); batch {args.batch} x seq "
          f"{args.seq}; LoRA r=16 on 7 projections; AdamW; {args.steps} steps")
    print(f"device: {device_line()}", flush=True)
    with tempfile.TemporaryDirectory() as ckpt:
        write_checkpoint(args, ckpt)
        sides = {side: run_side(side, ckpt, args) for side in ("bf16", "nf4")}

    print("\n| base | step peak (XLA) | step arguments | step temporaries | peak RSS | RSS after imports | "
          "RSS after load | loss first -> last |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for side, r in sides.items():
        print(f"| {side} | {r['step_peak'] / MiB:,.1f} MiB | {r['arguments'] / MiB:,.1f} MiB | "
              f"{r['temporaries'] / MiB:,.1f} MiB | {r['rss_peak'] / MiB:,.0f} MiB | {r['rss_baseline'] / MiB:,.0f} MiB | "
              f"{r['rss_after_load'] / MiB:,.0f} MiB | {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f} |")
    b, q = sides["bf16"], sides["nf4"]
    print(f"\nNF4 / bf16: step peak {q['step_peak'] / b['step_peak']:.2f}x, step arguments "
          f"{q['arguments'] / b['arguments']:.2f}x, peak RSS {q['rss_peak'] / b['rss_peak']:.2f}x, "
          f"peak RSS above the after-imports baseline "
          f"{(q['rss_peak'] - q['rss_baseline']) / (b['rss_peak'] - b['rss_baseline']):.2f}x")
    for side, r in sides.items():
        print(f"  {side}: {r['report']}")

    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    print(f"\nAbstract presets (nnx.eval_shape), LoRA r=16 on 7 projections, AdamW; per device: fsdp={args.devices}; "
          f"activations not included")
    print("| preset | base | NF4 weights | 16-bit weights | adapters | AdamW state | total | per device: base | "
          "per device: adapters + AdamW | per device: total |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, kind, rep, adam, shard in abstract_rows(presets, args.devices):
        nf4_weights = (f"{rep.quantized_base / GiB:.2f} GiB ({rep.bits_per_quantized_parameter:.3f} bits/param)"
                       if rep.quantized_params else "-")
        total = rep.quantized_base + rep.dense_base + rep.adapters + adam
        per_total = shard["base"] + shard["adapters"] + shard["adam"]
        print(f"| {name} | {kind} | {nf4_weights} | {rep.dense_base / GiB:.2f} GiB | {rep.adapters / GiB:.3f} GiB | "
              f"{adam / GiB:.3f} GiB | {total / GiB:.2f} GiB | {shard['base'] / GiB:.2f} GiB | "
              f"{(shard['adapters'] + shard['adam']) / GiB:.3f} GiB | {per_total / GiB:.2f} GiB |")
    print(f"device: {device_line()}")


if __name__ == "__main__":
    main()
