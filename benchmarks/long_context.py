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
"""
from __future__ import annotations

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

    import jlora
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", default="64,2048,8192", help="comma list of sequence lengths")
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per step when T is shorter (rows = tokens // T)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per backend (median reported)")
    ap.add_argument("--max-reference-seq", type=int, default=2048)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--loss", action="store_true", help="compare the chunked loss with whole logits instead")
    args = ap.parse_args()

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
