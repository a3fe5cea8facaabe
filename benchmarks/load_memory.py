"""Host memory of loading a checkpoint onto 8 devices (fsdp=8): streamed per shard vs loaded whole, then placed.

    python benchmarks/load_memory.py              # Llama-3.2-1B shapes, bf16 (~2.5 GB on disk), ~5 min on 2 cores
    python benchmarks/load_memory.py --layers 4   # fewer layers, same tensor shapes
    python benchmarks/load_memory.py --shape 8b --processes 8 --sides hosts   # the issue's goal: 8B, a host per eighth

A random bf16 checkpoint with the shapes of Llama-3.2-1B (hidden 2048, intermediate 8192, 32 heads,
8 kv heads, vocab 128256, tied embeddings; 16 layers unless --layers) is written once as safetensors
files of ~512 MiB with an index. Each side then runs in its own process with 8 virtual CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8), on the mesh fsdp=8:

- whole:   `load_hf(ckpt, dtype="bfloat16")` (every array on device 0), then the trainer's placement of
           the frozen state (`shard_state`: a device_put of each array onto the mesh), as `jlora train`
           did before the sharded load;
- sharded: `load_hf(ckpt, dtype="bfloat16", mesh=mesh)`: each array created per shard from the file.

Reported per side: the process' peak RSS (VmHWM) and its RSS after imports, the largest anonymous
RSS seen (RssAnon sampled every 2 ms: what the process allocated, without the checkpoint's pages it
had mapped, which also count in RSS), the most bytes device 0 held at once (its live buffers sampled
the same way), and the ratio sharded / whole of each.

On one host with virtual CPU devices every device's memory is host memory, so the host always ends
up holding the whole model: the gain shows as the transient on top of it (a second copy and mapped
file pages for `whole`, about one tensor's shard and one tensor's pages for `sharded`) and as device
0's peak (the whole model vs one eighth). On a pod each host would hold only its own devices' part.

`--processes N` (side `hosts`) measures that directly: N processes joined by jax.distributed (gloo on
CPU), each with 8/N virtual devices, load onto the one global mesh fsdp=8; each reports its own peak
RSS above its RSS after imports, against the goal (issue 12): <= 1.2 x (the host's share of the model,
model / N, plus one tensor, the largest).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MiB, GiB = 2**20, 2**30
SHAPES_1B = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=64, vocab_size=128256, num_hidden_layers=16, tie_word_embeddings=True)
SHAPES_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=128, vocab_size=128256, num_hidden_layers=32, tie_word_embeddings=False)
SHAPES = {"1b": ("Llama-3.2-1B", SHAPES_1B), "8b": ("Llama-3.1-8B", SHAPES_8B)}


def _status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def hf_config(layers: int | None, shape: str = "1b") -> dict:
    base = SHAPES[shape][1]
    return dict(base, num_hidden_layers=layers or base["num_hidden_layers"], architectures=["LlamaForCausalLM"], model_type="llama",
                max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=500000.0, torch_dtype="bfloat16",
                bos_token_id=1, eos_token_id=2)


def write_checkpoint(out: Path, layers: int | None, shard_bytes: int = 512 * MiB, shape: str = "1b") -> int:
    """Random bf16 weights (N(0, 0.02), norms 1) in safetensors shards plus an index; returns the bytes."""
    import torch
    from safetensors.torch import save_file

    cfg = hf_config(layers, shape)
    layers = cfg["num_hidden_layers"]
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i)})
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    weight_map, shard, size, total, files = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, size, files
        name = f"model-{files + 1:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        shard, size, files = {}, 0, files + 1

    for name, shape in shapes.items():
        t = torch.ones(shape, dtype=torch.bfloat16) if len(shape) == 1 else \
            (torch.randn(shape, dtype=torch.float32) * 0.02).to(torch.bfloat16)
        if size and size + t.numel() * 2 > shard_bytes:
            flush()
        shard[name], size, total = t, size + t.numel() * 2, total + t.numel() * 2
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(cfg))
    return total


def child(mode: str, ckpt: str) -> dict:
    """One side, in a process of its own (run with 8 virtual devices)."""
    import jax
    from flax import nnx

    import jlora
    from jlora.train.placement import shard_state
    from jlora.train.sharding import make_mesh

    assert jax.device_count() == 8, jax.devices()
    mesh = make_mesh("fsdp=8")
    device0 = jax.devices()[0]
    base = _status()
    peak = {"anon": base["RssAnon"], "device0": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak["anon"] = max(peak["anon"], _status()["RssAnon"])
            try:
                held = {s.data.unsafe_buffer_pointer(): s.data.nbytes for a in jax.live_arrays()
                        for s in a.addressable_shards if s.device == device0}
                peak["device0"] = max(peak["device0"], sum(held.values()))
            except Exception:  # noqa: BLE001 - an array deleted while it was being read
                pass
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    if mode == "whole":
        model = jlora.load_hf(ckpt, dtype="bfloat16")
        graphdef, state = nnx.split(model)
        del model
        state = shard_state(state, mesh)  # what the trainer did with the loaded model
    else:
        state = nnx.state(jlora.load_hf(ckpt, dtype="bfloat16", mesh=mesh))
    jax.block_until_ready(jax.tree.leaves(state))
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    end = _status()
    leaves = jax.tree.leaves(state)
    return dict(mode=mode, seconds=seconds, rss_after_imports=base["VmRSS"], anon_after_imports=base["RssAnon"],
                peak_rss=end["VmHWM"],
                rss_end=end["VmRSS"], peak_anon=peak["anon"], peak_device0=peak["device0"],
                model_bytes=sum(a.nbytes for a in leaves),
                device0_end=sum(s.data.nbytes for a in leaves for s in a.addressable_shards if s.device == device0))


def host_child(ckpt: str) -> dict:
    """One of N processes (jax.distributed from JAX_* variables), its 8/N devices part of the mesh fsdp=8:
    loads its shards; reports its own peak RSS."""
    from jlora.train import hosts
    hosts.initialize()
    import jax
    from flax import nnx

    import jlora
    from jlora.train.sharding import make_mesh

    assert jax.device_count() == 8, jax.devices()
    base = _status()
    t0 = time.perf_counter()
    state = nnx.state(jlora.load_hf(ckpt, dtype="bfloat16", mesh=make_mesh("fsdp=8")))
    leaves = jax.tree.leaves(state)
    jax.block_until_ready(leaves)
    seconds = time.perf_counter() - t0
    end = _status()
    local = sum(s.data.nbytes for a in leaves for s in a.addressable_shards)
    largest = max(a.nbytes for a in leaves)
    hosts.barrier("load_memory_done")
    return dict(process=jax.process_index(), seconds=seconds, rss_after_imports=base["VmRSS"],
                peak_rss=end["VmHWM"], rss_end=end["VmRSS"], local_bytes=local,
                model_bytes=sum(a.nbytes for a in leaves), largest_tensor=largest)


def run_hosts(ckpt: Path, processes: int) -> list[dict]:
    """`processes` children joined by jax.distributed on localhost; their reports."""
    import socket
    if 8 % processes:
        sys.exit(f"--processes {processes}: expected a divisor of 8 (the mesh is fsdp=8)")
    with socket.socket() as s:
        s.bind(("localhost", 0))
        address = f"localhost:{s.getsockname()[1]}"
    procs = []
    for i in range(processes):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": address,
               "JAX_NUM_PROCESSES": str(processes), "JAX_PROCESS_ID": str(i),
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={8 // processes}"}
        procs.append(subprocess.Popen([sys.executable, __file__, "--child", "host", "--ckpt", str(ckpt)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    reports = []
    for i, proc in enumerate(procs):
        out, err = proc.communicate()
        if proc.returncode:
            for other in procs:
                other.kill()
            sys.exit(f"host {i}: failed\n{err[-3000:]}")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


def report_hosts(reports: list[dict], processes: int, label: str) -> None:
    model, largest = reports[0]["model_bytes"], reports[0]["largest_tensor"]
    goal = 1.2 * (model / processes + largest)
    print(f"model: {label}, bf16, {model / GiB:.2f} GiB (largest tensor {largest / MiB:.0f} MiB); "
          f"{processes} processes x {8 // processes} devices, mesh fsdp=8")
    print(f"{'process':>8s} {'after imports':>14s} {'peak RSS':>10s} {'peak - imports':>15s} {'its shards':>11s} "
          f"{'goal 1.2x(model/N + tensor)':>28s} {'ratio':>6s} {'seconds':>8s}")
    for r in reports:
        used = r["peak_rss"] - r["rss_after_imports"]
        print(f"{r['process']:8d} {r['rss_after_imports'] / GiB:13.2f}G {r['peak_rss'] / GiB:9.2f}G "
              f"{used / GiB:14.2f}G {r['local_bytes'] / GiB:10.2f}G {goal / GiB:27.2f}G "
              f"{used / goal:6.2f} {r['seconds']:8.1f}")
    worst = max(r["peak_rss"] - r["rss_after_imports"] for r in reports)
    print(f"worst process: {worst / GiB:.2f} GiB above imports = {worst / goal:.2f} of the goal "
          f"({'met' if worst <= goal else 'NOT met'}); "
          f"= {worst / (model / processes + largest):.2f}x (model/N + largest tensor)")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--processes", type=int, default=8, help="processes of side `hosts`")
    parser.add_argument("--sides", default="whole,sharded", help="comma list of whole, sharded, hosts")
    parser.add_argument("--ckpt", help="reuse a checkpoint this script wrote (else a temporary one)")
    parser.add_argument("--child", choices=["whole", "sharded", "host"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(host_child(args.ckpt) if args.child == "host" else child(args.child, args.ckpt)))
        return
    sides = args.sides.split(",")
    with tempfile.TemporaryDirectory(prefix="jlora-load-memory-") as tmp:
        ckpt = Path(args.ckpt or Path(tmp) / "ckpt")
        if not (ckpt / "config.json").exists():
            t0 = time.perf_counter()
            size = write_checkpoint(ckpt, args.layers, shape=args.shape)
            print(f"wrote {size / GiB:.2f} GiB of bf16 weights to {ckpt} in {time.perf_counter() - t0:.0f} s")
        print(f"device: {_cpu()}, {os.cpu_count()} cores; jax {__import__('jax').__version__}")
        label = f"{SHAPES[args.shape][0]} shapes, {hf_config(args.layers, args.shape)['num_hidden_layers']} layers"
        if "hosts" in sides:
            report_hosts(run_hosts(ckpt, args.processes), args.processes, label)
        if not {"whole", "sharded"} <= set(sides):
            return
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
        results = {}
        for mode in ("whole", "sharded"):
            proc = subprocess.run([sys.executable, __file__, "--child", mode, "--ckpt", str(ckpt)], env=env,
                                  capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{mode}: failed\n{proc.stderr[-3000:]}")
            results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    whole, sharded = results["whole"], results["sharded"]
    model = whole["model_bytes"]
    cfg = hf_config(args.layers, args.shape)
    print("8 virtual CPU devices in one process, mesh fsdp=8")
    print(f"model: {label}, bf16, {model / GiB:.2f} GiB "
          f"(largest tensor: embed_tokens {cfg['vocab_size'] * cfg['hidden_size'] * 2 / MiB:.0f} MiB)")
    rows = [("peak RSS (VmHWM)", "peak_rss"), ("peak anonymous RSS (sampled)", "peak_anon"),
            ("RSS after imports", "rss_after_imports"), ("RSS at the end", "rss_end"),
            ("device 0 peak (sampled live buffers)", "peak_device0"), ("device 0 at the end", "device0_end")]
    print(f"{'':40s} {'whole+place':>12s} {'sharded':>12s} {'sharded/whole':>14s}")
    for label, key in rows:
        print(f"{label:40s} {whole[key] / GiB:11.2f}G {sharded[key] / GiB:11.2f}G "
              f"{sharded[key] / max(whole[key], 1):13.2f}x")
    for label, key, base in (("peak RSS above imports", "peak_rss", "rss_after_imports"),
                             ("peak anonymous above imports", "peak_anon", "anon_after_imports")):
        w, s = whole[key] - whole[base], sharded[key] - sharded[base]
        print(f"{label:40s} {w / GiB:11.2f}G {s / GiB:11.2f}G {s / max(w, 1):13.2f}x   "
              f"(model {model / GiB:.2f}G; transient over it: whole {(w - model) / GiB:.2f}G, "
              f"sharded {(s - model) / GiB:.2f}G)")
    print(f"load seconds: whole {whole['seconds']:.1f}, sharded {sharded['seconds']:.1f}")


if __name__ == "__main__":
    main()
