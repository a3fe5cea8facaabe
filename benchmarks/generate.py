"""Generation speed: jlora's jitted prefill + decode loop against transformers' `generate` on the same checkpoint.

    python benchmarks/generate.py                        # batch 1 and 8, prompt 32, 64 new tokens (greedy)
    python benchmarks/generate.py --batches 8 --new 128 --layers 8
    python benchmarks/generate.py --shape 135m --threads 0         # SmolLM2-135M's shape (30 layers, vocab 49k)

A random Llama (hidden 256, 4 layers, 4 / 2 heads of 64, vocab 8192, saved float32) is built with transformers
and saved; both sides load that directory in --dtype (float32 by default). Per batch size, each side runs
`max_new_tokens=1` (time to first token: the prefill and one pick) and `max_new_tokens=N` with no eos (every
row makes N tokens), alternately,
`--repeats` times; medians are printed. decode tokens/s = batch x (N - 1) / (time(N) - time(1)). jlora's
compilation is excluded (its first call, timed apart and printed). Printed ratios are jlora / transformers
from the same run, so load from other processes hits both sides alike.

`--threads` (default 1) sets torch's threads and XLA's CPU intra-op threads alike: on the shared 2-core box
under load, torch's 2-thread pool collapsed (batch 8, 64 tokens: 84 s with 2 threads, 3 s with 1).
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

if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # benchmarks/kernels.py must not shadow the `kernels` package bitsandbytes imports

os.environ.setdefault("JAX_PLATFORMS", "cpu")


SHAPES = {  # LlamaConfig fields; "135m": SmolLM2-135M's shape (benchmarks/train_step.py's 135m config)
    "tiny": dict(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64),
    "135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True),
}


def build(path, layers: int | None = None, shape: str = "tiny"):
    """A random Llama of `shape` (layers: override its depth) saved by transformers at `path`; its vocab size."""
    import torch
    import transformers
    fields = dict(SHAPES[shape], max_position_embeddings=2048)
    if layers:
        fields["num_hidden_layers"] = layers
    config = transformers.LlamaConfig(**fields)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return config.vocab_size


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--shape", default="tiny", choices=sorted(SHAPES), help="the model's shape (see SHAPES)")
    p.add_argument("--layers", type=int, default=None, help="override the shape's depth")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads and XLA CPU intra-op threads (0: defaults)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="both sides load the checkpoint in this dtype")
    p.add_argument("--scan", action="store_true", help="jlora loads the layers scanned (load_hf(scan_layers=True)): "
                   "the stacked cache path, as samples during a scanned training run take")
    args = p.parse_args(argv)
    if args.threads:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                                   f"intra_op_parallelism_threads={args.threads}").strip()

    import jax
    import numpy as np
    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    from jlora.generate.decode import generate_tokens

    with tempfile.TemporaryDirectory() as tmp:
        vocab = build(tmp, args.layers, args.shape)
        ref = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=getattr(torch, args.dtype)).eval()
        model = jlora.load_hf(tmp, args.dtype, scan_layers=args.scan)
    print(f"device: {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cpus; torch threads {torch.get_num_threads()}); shape {args.shape}, layers "
          f"{args.layers or SHAPES[args.shape]['num_hidden_layers']}"
          f"{' (jlora scanned)' if args.scan else ''}, "
          f"prompt {args.prompt}, new {args.new}, {args.dtype}, greedy")
    print(f"{'batch':>5}  {'side':<12}  {'ttft ms':>8}  {'decode tok/s':>12}  {'compile s':>9}")
    for b in args.batches:
        ids = np.random.RandomState(b).randint(3, vocab, (b, args.prompt))
        prompts = ids.tolist()

        def ours(n):
            generate_tokens(model, prompts, max_new_tokens=n)

        def theirs(n):
            with torch.no_grad():
                ref.generate(torch.tensor(ids), attention_mask=torch.ones_like(torch.tensor(ids)), do_sample=False,
                             max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0)

        began = time.perf_counter()
        ours(1), ours(args.new)  # compile both the prefill and the decode loop
        compile_s = time.perf_counter() - began
        theirs(1)  # warm-up
        times = {("jlora", 1): [], ("jlora", args.new): [], ("transformers", 1): [], ("transformers", args.new): []}
        for _ in range(args.repeats):
            for side, fn in (("jlora", ours), ("transformers", theirs)):
                for n in (1, args.new):
                    t = time.perf_counter()
                    fn(n)
                    times[side, n].append(time.perf_counter() - t)
        rows = {}
        for side in ("jlora", "transformers"):
            first = statistics.median(times[side, 1])
            decode = b * (args.new - 1) / max(1e-9, statistics.median(times[side, args.new]) - first)
            rows[side] = (first, decode)
            extra = f"{compile_s:>9.1f}" if side == "jlora" else f"{'':>9}"
            print(f"{b:>5}  {side:<12}  {first * 1e3:>8.1f}  {decode:>12.1f}  {extra}")
        print(f"{b:>5}  {'ratio':<12}  {rows['jlora'][0] / rows['transformers'][0]:>8.2f}x "
              f"{rows['jlora'][1] / rows['transformers'][1]:>12.2f}x  (jlora / transformers: ttft lower is better, "
              f"decode higher)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
