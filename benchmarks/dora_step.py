"""DoRA's cost: one forward + backward over the adapters with use_dora=True against the same LoRA, same run.

    python benchmarks/dora_step.py            # dense float32 and NF4 bases, ~1 minute on 2 idle CPU cores

Model: hidden 512, 2 layers, 8 / 4 heads, intermediate 1536, vocab 512; batch 2 x seq 256; r=16 on all seven
projections. Steps alternate (one LoRA, one DoRA) so that load from other processes hits both alike; the
best of `--steps` is reported. DoRA adds per projection the weight norm ||W + s A B|| (a pass over W, and
A @ B as an [in, out] float32 temporary, as PEFT computes it) and the rescale of the output.
"""
import jlora  # noqa: F401  (before jax and numpy: see jlora/host_malloc.py)
import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jlora.lora_layer import LoRAParam  # noqa: E402

CONFIG = dict(vocab_size=512, hidden_size=512, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=8,
              num_key_value_heads=4, max_position_embeddings=512, head_dim=64)


def step(use_dora: bool, nf4: bool, ids):
    model = jlora.init_random(jlora.LlamaConfig(**CONFIG), dtype="float32")
    if nf4:
        model = jlora.quantize_model(model)
    model = jlora.get_peft_model(model, jlora.LoraConfig(r=16, use_dora=use_dora), rngs=nnx.Rngs(0))
    graph, params, rest = nnx.split(model, LoRAParam, ...)
    fn = jax.jit(jax.value_and_grad(lambda p: jnp.mean(nnx.merge(graph, p, rest)(ids) ** 2)))
    jax.block_until_ready(fn(params))  # compile
    return lambda: jax.block_until_ready(fn(params))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    ids = np.random.RandomState(0).randint(0, CONFIG["vocab_size"], (2, 256))
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()})")
    for nf4 in (False, True):
        fns = {d: step(d, nf4, ids) for d in (False, True)}
        times = {d: [] for d in fns}
        for _ in range(args.steps):
            for d, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[d].append(time.perf_counter() - start)
        lora, dora = min(times[False]), min(times[True])
        print(f"{'NF4' if nf4 else 'float32'} base: LoRA {lora * 1e3:.0f} ms, DoRA {dora * 1e3:.0f} ms: "
              f"DoRA/LoRA {dora / lora:.2f}x")


if __name__ == "__main__":
    main()
