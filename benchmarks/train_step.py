"""One LoRA training step, jlora against transformers + PEFT, on the same checkpoint, batch and LoRA config.

    python benchmarks/train_step.py                    # the toy config, bf16 and f32, ~3 minutes on 2 idle CPU cores
    python benchmarks/train_step.py --quick            # a smaller model, a few steps
    python benchmarks/train_step.py --dtype f32 --steps 20
    python benchmarks/train_step.py --config toy,135m --with-plain   # real shapes; also time the plain jnp path

Configs (`--config`, a comma list; --hidden etc. override one field of each):
- toy:  hidden 512, 8 layers, 8 / 2 heads, intermediate 1408, vocab 8192, untied head; batch 4 x seq 256
- 135m: SmolLM2-135M's shape: hidden 576, 30 layers, 9 / 3 heads, intermediate 1536, vocab 49152, tied
        embeddings; batch 8 x seq 128
- 1b:   Llama-3.2-1B's shape with 4 of its 16 layers: hidden 2048, 32 / 8 heads, intermediate 8192,
        vocab 128256, tied; batch 4 x seq 128

The Llama checkpoint is built once by transformers (`torch.manual_seed(0)`, `from_config`, safetensors)
and read by both sides. LoRA r=16, alpha=16 on all seven projections; AdamW over the adapters only,
with global-norm clipping at 1.0 on both sides (jlora's `make_optimizer` default).

- jlora: `load_hf` -> `get_peft_model` -> `SplitModel` -> the jitted, donated `make_train_step`
  (the step `jlora train` runs), one micro-batch of [B, T].
- baseline: `AutoModelForCausalLM.from_pretrained` -> `peft.get_peft_model` -> forward with labels,
  backward, `clip_grad_norm_`, `AdamW.step`, `zero_grad`; `torch.set_num_threads(os.cpu_count())`.

On a GPU (jax[cuda] and a CUDA torch) both sides run on it: PEFT's model and batch move to "cuda", jlora
scans its layers as `jlora train` does off CPU (the loop on CPU), and `--peak-tflops P` (the device's dense
peak for the dtype) adds each side's MFU = step FLOPs (estimate) / step time / P. Scale the shapes up with
the overrides, e.g. `--config 1b --layers 16 --batch 8 --seq 2048 --dtype bf16 --peak-tflops 989`.

Each side runs alone, in a fresh process of its own, as a user runs it: jlora with the host malloc setting
`jlora train` applies (jlora/host_malloc.py), PEFT with glibc's defaults. A process builds its side,
runs one untimed step (the compile) and `--warmup` more, then `--steps` timed ones, and exits; the sides
take turns for `--rounds` rounds (jlora, PEFT, jlora, PEFT, ...) so that a change in machine load hits
both alike, and the median over all timed steps is reported. (They used to alternate step by step in one
process; that coupled them: in this 2-core VM a process that keeps its freed memory made the other one's
page faults several times dearer, and in one process jlora's setting slowed PEFT's bf16 step.)
Printed per config and dtype: s/step and tokens/s of each, the ratio jlora / PEFT, an achieved-TFLOP/s
estimate, and the device with the CPU's matmul flags (avx512f, avx512_bf16, amx_bf16). `--with-plain`
also times jlora's plain jnp reference path (`jlora.use_kernels(model, None)`) in the same rotation.
"""
from __future__ import annotations

import jlora  # noqa: F401  (before jax and numpy: see jlora/host_malloc.py)

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

# Run as `python benchmarks/train_step.py`, this folder is sys.path[0] and benchmarks/kernels.py would
# shadow the `kernels` package that bitsandbytes (imported by peft) looks for.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

DTYPES = {"bf16": "bfloat16", "f32": "float32"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


SHAPE_FIELDS = ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "tied", "batch", "seq")
CONFIGS = {
    "toy": dict(hidden=512, layers=8, heads=8, kv_heads=2, intermediate=1408, vocab=8192, tied=False,
                batch=4, seq=256),
    "135m": dict(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152, tied=True,
                 batch=8, seq=128),
    "1b": dict(hidden=2048, layers=4, heads=32, kv_heads=8, intermediate=8192, vocab=128256, tied=True,
               batch=4, seq=128),
    "quick": dict(hidden=256, layers=4, heads=8, kv_heads=2, intermediate=704, vocab=4096, tied=False,
                  batch=4, seq=128),
}


def hf_config(args):
    import transformers
    return transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(2048, args.seq), tie_word_embeddings=args.tied, use_cache=False)


def write_checkpoint(config, out_dir):
    import torch
    import transformers
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)


def step_flops(config, lora_params: int, tokens: int, seq: int) -> float:
    """FLOPs of one LoRA step (an estimate, counted the same for both sides).

    A frozen matmul weight costs 2 FLOPs per token forward and 2 backward (the input gradient only;
    frozen weights get no weight gradient): 4 * N_base. Adapters get both gradients: 6 * N_lora.
    Attention (QK^T and PV, computed over the full T x T, 4 * T * q_features per token per layer
    forward) costs 3x that forward + backward. Embedding lookup, norms, softmax and the optimizer
    are left out.
    """
    c = config
    head_dim = c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    per_layer = c.hidden_size * (q + 2 * kv) + q * c.hidden_size + 3 * c.hidden_size * c.intermediate_size
    n_base = c.num_hidden_layers * per_layer + c.hidden_size * c.vocab_size  # + lm_head
    attention = 3 * 4 * seq * q * c.num_hidden_layers
    return tokens * (4 * n_base + 6 * lora_params + attention)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def make_jlora(ckpt, dtype, tokens_np, args, *, plain=False, scan=False):
    """The jlora side: the loop model, as `jlora train` runs on CPU (`scan`: stacked layers under lax.scan,
    its default on accelerators)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jlora.train.optimizer import learning_rate_schedule, make_optimizer
    from jlora.train.state import SplitModel
    from jlora.train.step import make_train_step

    model = jlora.load_hf(ckpt, dtype=dtype, scan_layers=scan)
    model = jlora.get_peft_model(model, jlora.LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS),
                                 rngs=nnx.Rngs(0))
    if plain:
        jlora.use_kernels(model, None)  # the plain jnp reference path
    lora_params, _ = jlora.trainable_parameters(model)
    split = SplitModel.of(model)
    params, frozen = split.params(), split.frozen
    del model
    tx = make_optimizer(learning_rate_schedule(2e-4, 1000, 0))
    opt = tx.init(params)
    step = jax.jit(make_train_step(split, tx), donate_argnums=(0, 1))

    b, t = args.batch, args.seq
    ids = jnp.asarray(tokens_np, jnp.int32)
    batch = {  # [grad_accum=1, B, T]
        "inputs": ids[None, :, :t],
        "targets": ids[None, :, 1:],
        "loss_mask": jnp.ones((1, b, t), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (1, b, t)),
        "segment_ids": jnp.ones((1, b, t), jnp.int32),
    }
    key = jax.random.key(0)
    state = {"params": params, "opt": opt, "i": 0, "loss": None}

    def run_one():
        p, o, m = step(state["params"], state["opt"], frozen, batch, key, jnp.asarray(state["i"], jnp.int32))
        state["loss"] = float(m["loss"])  # blocks
        state.update(params=p, opt=o, i=state["i"] + 1)

    return run_one, state, lora_params


def make_peft(ckpt, dtype, tokens_np, args):
    import peft
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # as jax: the accelerator if any
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=getattr(torch, dtype)).to(device)
    model.config.use_cache = False
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0,
                                                       target_modules=TARGETS, bias="none"))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=2e-4, weight_decay=0.0)
    # The same T input tokens as jlora; HF shifts labels itself, so its loss covers T - 1 of them.
    ids = torch.from_numpy(tokens_np[:, :args.seq].astype(np.int64)).to(device)
    state = {"loss": None}

    def run_one():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["loss"] = float(out.loss.detach())  # waits for the device

    return run_one, state


def jlora_scans() -> bool:
    """Whether `jlora train` would scan the layers here (its auto rule: the loop on CPU, the scan elsewhere)."""
    from jlora.train.config import TrainConfig
    from jlora.train.scan_layers import decide
    return decide(TrainConfig(lora_dropout=0.0))[0]


def _side_worker(conn, side, ckpt, dtype, tokens_np, args):
    """One side in a fresh process: build it, run 1 + warmup untimed steps, then `args.steps` timed ones."""
    if os.environ.pop(_PARENT_MARK, None):  # jax's own memory default on an accelerator, as a user has it
        os.environ.pop("XLA_PYTHON_CLIENT_PREALLOCATE", None)
    if side == "peft":
        run_one, state = make_peft(ckpt, dtype, tokens_np, args)
        lora_params = None
    else:
        run_one, state, lora_params = make_jlora(ckpt, dtype, tokens_np, args, plain=side == "plain",
                                                 scan=jlora_scans())
    first = timed(run_one)
    for _ in range(args.warmup):
        run_one()
    times = [timed(run_one) for _ in range(args.steps)]
    conn.send(dict(first=first, times=times, loss=state["loss"], lora_params=lora_params))


def run_isolated(side, ckpt, dtype, tokens_np, args) -> dict:
    """Runs one side (jlora | plain | peft) in a spawned process of its own, alone on the machine, and
    returns {first, times, loss, lora_params}. jlora's process starts with JLORA_KEEP_HOST_MEMORY=1, as
    `jlora train` runs (jlora/host_malloc.py); PEFT's with =0, glibc's defaults as a PEFT user has them."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    saved = os.environ.get("JLORA_KEEP_HOST_MEMORY")
    os.environ["JLORA_KEEP_HOST_MEMORY"] = "0" if side == "peft" else "1"  # jlora as `jlora train` runs
    try:
        proc = ctx.Process(target=_side_worker, args=(child, side, ckpt, dtype, tokens_np, args))
        proc.start()
    finally:
        if saved is None:
            os.environ.pop("JLORA_KEEP_HOST_MEMORY", None)
        else:
            os.environ["JLORA_KEEP_HOST_MEMORY"] = saved
    child.close()
    try:
        result = parent.recv()
    except EOFError:
        raise RuntimeError(f"the {side} process failed (its traceback is above)") from None
    finally:
        proc.join()
    return result


def rotated(sides: list[str], rounds: int, run) -> dict:
    """{side: [result of each round]}, running the sides in turn (A, B, A, B, ...) so that a change in
    machine load over the run hits every side alike."""
    out = {side: [] for side in sides}
    for _ in range(rounds):
        for side in sides:
            out[side].append(run(side))
    return out


def _write_checkpoint_process(config, out_dir):
    """write_checkpoint in a spawned process, so that this one never starts torch's thread pool."""
    import multiprocessing

    proc = multiprocessing.get_context("spawn").Process(target=write_checkpoint, args=(config, out_dir))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"writing the checkpoint failed (exit status {proc.exitcode}; traceback above)")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> str:
    """The matmul-relevant flags of /proc/cpuinfo: which native paths XLA (YNNPACK/oneDNN) and torch can use."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return " ".join(f for f in wanted if f in flags) or "none of avx2/avx512/amx"


_PARENT_MARK = "JLORA_TRAIN_STEP_PARENT_NO_PREALLOCATE"


def device_line() -> str:
    if "XLA_PYTHON_CLIENT_PREALLOCATE" not in os.environ:  # read when jax's backend starts, below
        # this parent only asks jax which device it has: it must not take 75% of a GPU from the sides' processes
        os.environ.update({"XLA_PYTHON_CLIENT_PREALLOCATE": "false", _PARENT_MARK: "1"})
    import jax
    import torch
    d = jax.devices()[0]
    if torch.cuda.is_available():
        return (f"jax {jax.__version__} on {d.platform} ({d.device_kind}), torch {torch.__version__} on "
                f"{torch.cuda.get_device_name(0)}; cpu: {cpu_model()}, {os.cpu_count()} cores")
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"jax {jax.__version__} on {d.platform} ({d.device_kind}), torch {torch.__version__} "
            f"({os.cpu_count()} threads); cpu: {cpu_model()}, {os.cpu_count()} cores, "
            f"flags {cpu_flags()}; "
            f"load average {load}")


def busy_warning() -> None:
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > 1.5 * cores:
        print(f"WARNING: load average {load:.1f} on {cores} cores: other processes share the CPU, "
              f"so absolute numbers are low and noisy; the interleaved ratio is the number to read, "
              f"and OpenMP (torch) suffers more from oversubscription than XLA's thread pool.")


def run_config(name, args, dtypes, with_plain):
    """Times every dtype of one config; returns the table rows."""
    config = hf_config(args)
    tokens_np = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq + 1), dtype=np.int32)
    tokens = args.batch * args.seq
    print(f"[{name}] Llama: hidden {args.hidden}, {args.layers} layers, {args.heads} heads / {args.kv_heads} kv, "
          f"intermediate {args.intermediate}, vocab {args.vocab}, {'tied' if args.tied else 'untied'} head; "
          f"batch {args.batch} x seq {args.seq} = {tokens} tokens/step; LoRA r=16 alpha=16 on 7 projections; "
          f"{args.steps} timed steps x {args.rounds} rounds, each side alone in its own process (median)", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as ckpt:
        _write_checkpoint_process(config, ckpt)
        for d in dtypes:
            dtype = DTYPES[d]
            names = ["jlora"] + (["plain"] if with_plain else []) + ["peft"]
            results = rotated(names, args.rounds, lambda side: run_isolated(side, ckpt, dtype, tokens_np, args))
            times = {k: [t for r in v for t in r["times"]] for k, v in results.items()}
            med = {k: statistics.median(v) for k, v in times.items()}
            lora_params = results["jlora"][0]["lora_params"]
            flops = step_flops(config, lora_params, tokens, args.seq)
            rows.append(dict(config=name, dtype=d, tokens=tokens, s=med, ratio=med["peft"] / med["jlora"],
                             best=min(times["peft"]) / min(times["jlora"]), tflops=flops / med["jlora"] / 1e12,
                             gflop=flops / 1e9))
            for k in names:
                rounds = ", ".join(f"{statistics.median(r['times']):.3f}" for r in results[k])
                print(f"  {d} {k}: {med[k]:.3f} s/step (first {results[k][0]['first']:.1f} s, "
                      f"loss {results[k][-1]['loss']:.4f}, min {min(times[k]):.3f} max {max(times[k]):.3f}; "
                      f"medians of the rounds {rounds})", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="toy", help=f"comma list of {sorted(CONFIGS)}")
    ap.add_argument("--dtype", default="bf16,f32", help="comma list of bf16, f32")
    ap.add_argument("--quick", action="store_true", help="the small 'quick' config, few steps")
    ap.add_argument("--with-plain", action="store_true", help="also time jlora's plain jnp reference path")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per side and round")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps after the first (compile) step")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's dense peak TFLOP/s for the dtype (e.g. 989 for an H100/H200 in bf16): "
                         "adds each side's MFU, the step's FLOP estimate over time over this peak")
    ap.add_argument("--rounds", type=int, default=2,
                    help="times each side runs in a fresh process of its own, in turn (jlora, PEFT, jlora, ...)")
    for field in SHAPE_FIELDS:
        if field == "tied":
            ap.add_argument("--tied", type=int, choices=(0, 1), default=None, help="tie embeddings (1) or not (0)")
        else:
            ap.add_argument("--" + field.replace("_", "-"), type=int, default=None, help=f"override {field}")
    args = ap.parse_args()
    names = ["quick"] if args.quick else [c.strip() for c in args.config.split(",") if c.strip()]
    if args.quick:
        args.steps, args.warmup, args.rounds = 3, 0, 1
    for c in names:
        if c not in CONFIGS:
            raise SystemExit(f"--config: expected a comma list of {sorted(CONFIGS)}, found {c!r}")
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"--dtype: expected a comma list of {sorted(DTYPES)}, found {d!r}")

    print(f"device: {device_line()}", flush=True)
    busy_warning()
    rows = []
    for name in names:
        shape = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in CONFIGS[name].items()}
        cfg_args = argparse.Namespace(**{**vars(args), **shape})
        cfg_args.tied = bool(cfg_args.tied)
        rows += run_config(name, cfg_args, dtypes, args.with_plain)

    plain = args.with_plain
    print("\n| config | dtype | jlora s/step | PEFT s/step | jlora tokens/s | PEFT tokens/s | jlora / PEFT (median) "
          "| (best step) | jlora TFLOP/s |" + (" plain s/step | plain / PEFT |" if plain else "")
          + (" jlora MFU | PEFT MFU |" if args.peak_tflops else ""))
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if plain else "")
          + (" ---: | ---: |" if args.peak_tflops else ""))
    for r in rows:
        s = r["s"]
        line = (f"| {r['config']} | {r['dtype']} | {s['jlora']:.3f} | {s['peft']:.3f} | {r['tokens'] / s['jlora']:,.0f} "
                f"| {r['tokens'] / s['peft']:,.0f} | {r['ratio']:.2f}x | {r['best']:.2f}x | {r['tflops']:.3f} |")
        if plain:
            line += f" {s['plain']:.3f} | {s['peft'] / s['plain']:.2f}x |"
        if args.peak_tflops:
            mfu = {k: r["gflop"] / 1e3 / s[k] / args.peak_tflops for k in ("jlora", "peft")}
            line += f" {100 * mfu['jlora']:.1f}% | {100 * mfu['peft']:.1f}% |"
        print(line)
    print("step FLOPs (estimate, see step_flops): " + ", ".join(
        f"{r['config']} {r['gflop']:.1f} GFLOP" for r in rows if r["dtype"] == rows[0]["dtype"]))
    print(f"device: {device_line()}")
    busy_warning()


if __name__ == "__main__":
    main()
