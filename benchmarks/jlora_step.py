"""jlora alone, for A/B of a code change: run it on each version (git checkout / worktree) and compare medians.

    python benchmarks/jlora_step.py --config 135m --dtype bf16     # the train step of train_step.py's config
    python benchmarks/jlora_step.py --attention 2048               # blockwise attention forward + backward

Step: benchmarks/train_step.py's config (random weights, `init_random`), LoRA r=16 on the seven projections,
the jitted, donated `make_train_step` over one micro-batch; 2 warm-up steps (the first compiles), then
`--steps` timed, median printed. Attention: `jlora.attention.blockwise_attention` forward + backward (the
gradients of q, k, v) at T, batch 2, 3 kv heads x 3 queries each, head_dim 64, float32 and bf16, median of 5.
Nothing here runs PEFT: ratios against PEFT come from benchmarks/train_step.py.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def step_seconds(config: str, dtype: str, steps: int) -> list[float]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jlora
    from jlora.llama_config import LlamaConfig
    from jlora.train.optimizer import learning_rate_schedule, make_optimizer
    from jlora.train.state import SplitModel
    from jlora.train.step import make_train_step
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    from train_step import CONFIGS, TARGETS  # pylint: disable=import-outside-toplevel
    sys.path[:] = [p for p in sys.path if p != here]

    c = CONFIGS[config]
    model = jlora.init_random(LlamaConfig(
        vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["intermediate"],
        num_hidden_layers=c["layers"], num_attention_heads=c["heads"], num_key_value_heads=c["kv_heads"],
        head_dim=c["hidden"] // c["heads"], tie_word_embeddings=c["tied"]), dtype={"f32": "float32", "bf16": "bfloat16"}[dtype])
    model = jlora.get_peft_model(model, jlora.LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS),
                                 rngs=nnx.Rngs(0))
    split = SplitModel.of(model)
    params, frozen = split.params(), split.frozen
    del model
    tx = make_optimizer(learning_rate_schedule(2e-4, 1000, 0))
    opt = tx.init(params)
    step = jax.jit(make_train_step(split, tx), donate_argnums=(0, 1))
    b, t = c["batch"], c["seq"]
    ids = jax.random.randint(jax.random.key(0), (1, b, t + 1), 0, c["vocab"], jnp.int32)
    batch = {"inputs": ids[:, :, :t], "targets": ids[:, :, 1:], "loss_mask": jnp.ones((1, b, t), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (1, b, t)),
             "segment_ids": jnp.ones((1, b, t), jnp.int32)}
    times = []
    for i in range(steps + 2):
        began = time.perf_counter()
        out = jax.block_until_ready(step(params, opt, frozen, batch, jax.random.key(0), jnp.asarray(i)))
        params, opt = out[0], out[1]
        times.append(time.perf_counter() - began)
    return times[2:]


def attention_seconds(seq: int, dtype) -> list[float]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jlora.attention import blockwise_attention
    r = np.random.RandomState(0)
    b, kv, g, d = 2, 3, 3, 64
    q = jnp.asarray(r.randn(b, seq, kv, g, d), dtype)
    k, v = (jnp.asarray(r.randn(b, seq, kv, d), dtype) for _ in "kv")
    seg = jnp.ones((b, seq), jnp.int32)
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(blockwise_attention(q, k, v, seg, scale=0.125)
                                                     .astype(jnp.float32) ** 2), argnums=(0, 1, 2)))
    jax.block_until_ready(grad(q, k, v))
    times = []
    for _ in range(5):
        began = time.perf_counter()
        jax.block_until_ready(grad(q, k, v))
        times.append(time.perf_counter() - began)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="135m", help="benchmarks/train_step.py's CONFIGS key")
    p.add_argument("--dtype", default="bf16", choices=("f32", "bf16"))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--attention", type=int, default=None, metavar="T",
                   help="time blockwise attention forward + backward at this length instead of the step")
    args = p.parse_args(argv)
    load = f"load {os.getloadavg()[0]:.1f}, {os.cpu_count()} cpus"
    if args.attention:
        import jax.numpy as jnp
        for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
            ms = statistics.median(attention_seconds(args.attention, dtype)) * 1e3
            print(f"blockwise attention fwd+bwd T={args.attention} {name}: {ms:.1f} ms ({load})")
        return 0
    times = step_seconds(args.config, args.dtype, args.steps)
    print(f"jlora step {args.config} {args.dtype}: median {statistics.median(times):.3f} s "
          f"(steps {[round(x, 3) for x in times]}; {load})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
