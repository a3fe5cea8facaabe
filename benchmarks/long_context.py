"""Long context on CPU: the LoRA train step with blockwise attention against the materialized reference.

    python benchmarks/long_context.py                  # T=64 x 16 rows (the demo's shape), T=2048, T=8192
    python benchmarks/long_context.py --seqs 2048 --steps 5
    python benchmarks/long_context.py --loss --seqs 512 --tokens 4096   # chunked loss vs whole logits

For each sequence length: the jitted train step (`make_train_step`, the step `jlora train` runs: chunked
loss, AdamW over the adapters) of a small random Llama (hidden 256, 4 layers, 4 / 2 heads of 64, vocab
8192, untied head, LoRA r=16 on the seven projections), one micro-batch of `--tokens` tokens per row
group (rows = max(1, tokens // T)). Printed per backend: median s/step, tokens/s, the ratio blockwise /
reference from steps timed alternately in the same run (so load from other processes hits both alike),
and XLA's memory analysis of the compiled step (temporaries, arguments). The reference is skipped above
`--max-reference-seq` (its [T, T] scores per layer and head are what the blockwise path removes): there
it is only compiled, for its memory analysis.
With `--loss`, the two sides are instead the chunked loss (the default, ~2048 tokens a chunk) and the
whole `[tokens, vocab]` logits (`loss_chunk_tokens=None`), both on the "auto" attention.

    python benchmarks/long_context.py --goals [--compiled plan1.json plan2.json ...]

The issue-11 goals table for TPUs (no TPU needed): Llama-3.1-8B, NF4 base, LoRA r=16 on all seven
projections, one sequence per chip (v5p:2x2x1 and v5e:2x2, batch 4, fsdp 4), T in {8k, 32k, 128k, 256k};
"before" = reference attention and whole-logits loss, "after" = splash attention and the chunked loss.
Each cell is `jlora plan`'s estimate (jlora.plan.estimate; FLOPs counted from the architecture, with the
recomputed forward under remat) for the first remat policy of none, full, offload that fits, or the
lightest-memory one (offload) when none fits. `--compiled` adds rows from `jlora plan --json` outputs
(compiled by libtpu: bytes, host bytes, FLOPs and roofline from the compiler), labelled "compiled".

    python benchmarks/long_context.py --goals-layers v5p:2x2x1:131072:full v5e:2x2:32768:full ...

compiles the same step with 2 and 4 decoder layers (libtpu, fast effort) and extrapolates to 32: every
decoder layer adds the same bytes, host bytes and FLOPs under a per-layer remat policy, so
X(32) = X(2) + 15 (X(4) - X(2)); a whole 32-layer 8B compile takes 2 to 10+ minutes of one core here.
Labelled "compiled 2+4 layers, extrapolated".
"""
from __future__ import annotations

import jlora  # noqa: F401  (before jax and numpy: see jlora/host_malloc.py)

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # benchmarks/kernels.py must not shadow the `kernels` package bitsandbytes imports

os.environ.setdefault("JAX_PLATFORMS", "cpu")

CONFIG = dict(model_type="llama", hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=8192, max_position_embeddings=8192, rms_norm_eps=1e-5,
              tie_word_embeddings=False)


def cpu_description() -> str:
    model, flags = platform.processor() or "unknown", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model}, {os.cpu_count()} cores, flags {' '.join(wanted) or 'none of avx2/avx512/amx'}"


def build_step(backend: str, rows: int, seq: int, dtype: str, loss_chunk_tokens="default"):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from jlora.attention import use_attention
    from jlora.llama import init_random
    from jlora.llama_config import LlamaConfig
    from jlora.train.state import SplitModel
    from jlora.train.step import make_train_step

    model = init_random(LlamaConfig.from_hf_dict(CONFIG), dtype=dtype)
    model = jlora.get_peft_model(model, jlora.LoraConfig(r=16, lora_alpha=16), rngs=nnx.Rngs(1))
    use_attention(model, backend)
    split = SplitModel.of(model)
    params, tx = split.params(), optax.adamw(1e-4)
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, CONFIG["vocab_size"], (1, rows, seq + 1)).astype(np.int32)
    batch = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:], "loss_mask": np.ones((1, rows, seq), np.int32),
             "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (1, rows, seq)),
             "segment_ids": np.ones((1, rows, seq), np.int32)}
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    opt = tx.init(params)
    kw = {} if loss_chunk_tokens == "default" else {"loss_chunk_tokens": loss_chunk_tokens}
    compiled = jax.jit(make_train_step(split, tx, **kw)).lower(params, opt, split.frozen, batch, jax.random.key(0),
                                                        jnp.asarray(0)).compile()
    mem = compiled.memory_analysis()

    def run():
        out = compiled(params, opt, split.frozen, batch, jax.random.key(0), jnp.asarray(0))
        jax.block_until_ready(out)
        return float(out[2]["loss"])

    return run, mem.temp_size_in_bytes, mem.argument_size_in_bytes


GOAL_SEQS = (8192, 32768, 131072, 262144)
GOAL_TOPOLOGIES = ("v5p:2x2x1", "v5e:2x2")


def goals(compiled_files) -> None:
    """Prints the goals table (see the module docstring)."""
    import json

    from jlora.plan.planner import Attempt, Planner, PlanRequest
    from jlora.remat import AUTO_ORDER

    print(f"# {datetime.date.today()}  {cpu_description()}  load avg {os.getloadavg()[0]:.1f}")
    print("# llama-3.1-8b NF4, LoRA r=16 all-linear, batch 4 = one sequence per chip, fsdp=4; GiB per chip")
    print(f"{'topology':<10} {'side':<7} {'T':>7} {'remat':<8} {'HBM/chip':>9} {'host/chip':>9} {'fits':<5} "
          f"{'TFLOP/chip':>10} {'step s':>8} {'tok/s/chip':>10}  source")
    for topology in GOAL_TOPOLOGIES:
        for side, attention, chunk in (("before", "reference", None), ("after", "splash", 2048)):
            for seq in GOAL_SEQS:
                planner = Planner(PlanRequest(model="llama-3.1-8b", topology=topology, quantize="nf4", r=16,
                                              batch_size=4, seq_len=seq, attention=attention,
                                              loss_chunk_tokens=chunk, suggest=False))
                sizes = planner.mesh_sizes()
                hbm = planner.topology.chip.hbm_bytes
                chosen = None
                for remat in AUTO_ORDER:
                    est = planner.estimate(sizes, 4, remat)
                    chosen = Attempt(remat=remat, mesh=sizes, batch_size=4, grad_accum=1, fits=est <= hbm,
                                     bytes_per_chip=est, source="estimate", exact=False, seq_len=seq,
                                     host_bytes_per_chip=planner.estimate_host(sizes, 4, remat))
                    if chosen.fits:
                        break
                _row(topology, side, seq, chosen, planner.roofline_of(chosen), planner.topology.chips)
    for path in compiled_files:
        r = json.loads(open(path).read())
        side = "after" if r["attention"] == "splash" and r["loss_chunk_tokens"] else "before"
        print(f"{r['topology']:<10} {side:<7} {r['seq_len']:>7} {r['remat']:<8} {r['bytes_per_chip'] / 2**30:>9.2f} "
              f"{r['host_bytes_per_chip'] / 2**30:>9.2f} {'yes' if r['fits'] else 'no':<5} "
              + (f"{r['flops_per_chip'] / 1e12:>10.1f} {r['step_seconds']:>8.2f} "
                 f"{r['tokens_per_second'] / r['chips']:>10.0f}" if r['flops_per_chip'] else f"{'':>30}")
              + f"  compiled ({r['attempts'][-1]['compile_seconds']:.0f} s, {os.path.basename(path)})")


LLAMA_31_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
               "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
               "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
               "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}


def goals_by_layers(points, *, attention="splash", chunk=2048, layer_counts=(2, 4)) -> None:
    """Compiles each TOPOLOGY:T:REMAT point at two layer counts and prints the 32-layer extrapolation."""
    import json
    import tempfile

    from jlora.plan.planner import Planner, PlanRequest
    from jlora.plan.roofline import roofline

    print(f"# {datetime.date.today()}  {cpu_description()}  load avg {os.getloadavg()[0]:.1f}")
    lo, hi = layer_counts
    print(f"# llama-3.1-8b NF4 ({lo} and {hi} layers compiled, extrapolated to 32), r=16 all-linear, batch 4 = one "
          f"sequence per chip, fsdp=4, attention {attention}, loss chunk {chunk}; GiB per chip")
    print(f"{'topology':<10} {'T':>7} {'remat':<8} {'HBM/chip':>9} {'host/chip':>9} {'fits':<5} {'TFLOP/chip':>10} "
          f"{'step s':>8} {'tok/s/chip':>10}  compile s ({lo}, {hi} layers)")
    tmp = tempfile.mkdtemp(prefix="jlora-goals-")
    for point in points:
        gen, grid, seq, remat = point.split(":")
        topology, seq = f"{gen}:{grid}", int(seq)
        got = {}
        for layers in layer_counts:
            path = os.path.join(tmp, f"l{layers}")
            os.makedirs(path, exist_ok=True)
            with open(os.path.join(path, "config.json"), "w") as f:
                json.dump({**LLAMA_31_8B, "num_hidden_layers": layers}, f)
            planner = Planner(PlanRequest(model=path, topology=topology, quantize="nf4", r=16, batch_size=4,
                                          seq_len=seq, remat=remat, attention=attention, loss_chunk_tokens=chunk,
                                          suggest=False), log=lambda *a: print("#", *a, file=sys.stderr, flush=True))
            a = planner.attempt(planner.mesh_sizes(), 4, remat)
            got[layers] = (a, planner)
            print(f"#   {layers} layers: {a.source}, HBM/chip {a.bytes_per_chip / 2**30:.3f} GiB (temporaries "
                  f"{a.memory.get('temporaries', 0) / 2**30:.3f}), host {a.host_bytes_per_chip / 2**30:.3f} GiB, "
                  f"{(a.flops_per_chip or 0) / 1e12:.1f} TFLOP", flush=True)
        (a2, planner), (a4, _) = got[lo], got[hi]

        def at32(x2, x4):
            return x2 + (32 - lo) / (hi - lo) * (x4 - x2)
        hbm = planner.topology.chip.hbm_bytes
        total, host = at32(a2.bytes_per_chip, a4.bytes_per_chip), at32(a2.host_bytes_per_chip, a4.host_bytes_per_chip)
        compiled = a2.source == a4.source == "compiled"
        if compiled:
            flops = at32(a2.flops_per_chip, a4.flops_per_chip)
            traffic = at32(a2.bytes_accessed_per_chip, a4.bytes_accessed_per_chip)
            rf = roofline(flops_per_chip=flops, bytes_per_chip=traffic, chip=planner.topology.chip,
                          chips=planner.topology.chips, model_flops=0.0)
            perf = f"{flops / 1e12:>10.1f} {rf.step_seconds:>8.2f} {seq / rf.step_seconds:>10.0f}"
        else:
            perf = f"{'':>30}"
        print(f"{topology:<10} {seq:>7} {remat:<8} {total / 2**30:>9.2f} {host / 2**30:>9.2f} "
              f"{('yes' if total <= hbm else 'no') if compiled else a4.source:<5} {perf}  "
              f"{a2.compile_seconds:.0f}, {a4.compile_seconds:.0f}", flush=True)


def _row(topology, side, seq, a, rf, chips):
    tokens = a.batch_size * seq
    print(f"{topology:<10} {side:<7} {seq:>7} {a.remat:<8} {a.bytes_per_chip / 2**30:>9.2f} "
          f"{a.host_bytes_per_chip / 2**30:>9.2f} {'yes' if a.fits else 'no':<5} "
          f"{rf.compute_seconds * rf.peak_flops / 1e12:>10.1f} {rf.step_seconds:>8.2f} "
          f"{tokens / rf.step_seconds / chips:>10.0f}  estimate", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", default="64,2048,8192", help="comma list of sequence lengths")
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per step when T is shorter (rows = tokens // T)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per backend (median reported)")
    ap.add_argument("--max-reference-seq", type=int, default=2048)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--loss", action="store_true", help="compare the chunked loss with whole logits instead")
    ap.add_argument("--goals", action="store_true", help="the issue-11 TPU goals table (estimates, no TPU)")
    ap.add_argument("--compiled", nargs="*", default=[], help="with --goals: `jlora plan --json` outputs to add")
    ap.add_argument("--goals-layers", nargs="*", metavar="TOPOLOGY:T:REMAT",
                    help="compile these goal points at two layer counts and extrapolate to 32")
    ap.add_argument("--layers", default="2,4", help="with --goals-layers: the two layer counts compiled")
    args = ap.parse_args()
    if args.goals_layers:
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        return goals_by_layers(args.goals_layers, layer_counts=tuple(int(n) for n in args.layers.split(",")))
    if args.goals:
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        return goals(args.compiled)

    import jax
    print(f"# {datetime.date.today()}  jax {jax.__version__}  {jax.devices()[0].platform}: {cpu_description()}  "
          f"load avg {os.getloadavg()[0]:.1f}")
    print(f"# model {CONFIG}, {args.dtype}, LoRA r=16 all seven projections, AdamW")
    print(f"{'T':>6} {'rows':>4} {'backend':<10} {'s/step':>8} {'tokens/s':>9} {'temp MiB':>9} {'args MiB':>9}  ratio")
    for seq in (int(s) for s in args.seqs.split(",")):
        rows = max(1, args.tokens // seq)
        if args.loss:
            variants = {"chunked": ("auto", "default"), "whole": ("auto", None)}
        else:
            variants = {b: (b, "default") for b in ["blockwise"] + (["reference"] if seq <= args.max_reference_seq
                                                                   else [])}
        base = "whole" if args.loss else "reference"
        sides = {}
        for b, (backend, chunk) in variants.items():
            run, temp, argb = build_step(backend, rows, seq, args.dtype, chunk)
            run()  # warm-up
            sides[b] = (run, temp, argb, [])
        for _ in range(args.steps):
            for b, (run, _, _, times) in sides.items():
                t0 = time.perf_counter()
                run()
                times.append(time.perf_counter() - t0)
        med = {b: statistics.median(s[3]) for b, s in sides.items()}
        for b, (_, temp, argb, _) in sides.items():
            ratio = f"{med[base] / med[b]:.2f}x {base} speed" if base in med and b != base else ""
            print(f"{seq:>6} {rows:>4} {b:<10} {med[b]:>8.3f} {rows * seq / med[b]:>9.0f} {temp / 2**20:>9.1f} "
                  f"{argb / 2**20:>9.1f}  {ratio}", flush=True)
        if not args.loss and seq > args.max_reference_seq:  # compiled for its memory analysis only
            _, temp, argb = build_step("reference", rows, seq, args.dtype)
            print(f"{seq:>6} {rows:>4} {'reference':<10} {'not run':>8} {'':>9} {temp / 2**20:>9.1f} "
                  f"{argb / 2**20:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
