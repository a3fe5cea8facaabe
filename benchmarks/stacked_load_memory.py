"""Host peak memory (RSS high-water mark) of loading a checkpoint with scanned layers, three ways.

    python benchmarks/stacked_load_memory.py [--hidden 512 --layers 8 --vocab 2048]

Each way runs in a fresh process (the high-water mark VmHWM is reset after the imports) on one CPU device, float32:
  loop        load_hf(dir): the loop model (the reference: one copy of the model)
  direct      load_hf(dir, scan_layers=True): stacks built while loading (stacked.LayerStackBuilder)
  stack-all   load_hf(dir), then every layer variable stacked at once with the loop layers kept alive
              until the end (how stack_layers worked before it went variable by variable: loop + stack)
Printed: the model's bytes, and each way's peak RSS above the process's RSS after importing jax/jlora,
as a ratio to the model's bytes.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> float:
    """Resets the RSS high-water mark (Linux: clear_refs 5) and returns the RSS now."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def _child(way: str, ckpt: str) -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jlora
    from jlora.models.stacked import _stack_leaves
    jnp.zeros(1).block_until_ready()
    base = _reset_peak()
    if way == "loop":
        model = jlora.load_hf(ckpt)
    elif way == "direct":
        model = jlora.load_hf(ckpt, scan_layers=True)
    else:
        model = jlora.load_hf(ckpt)
        states = [nnx.state(layer) for layer in model.model.layers]
        stacked = jax.tree.map(_stack_leaves, *states)  # every stack while every row is alive
        jax.block_until_ready(stacked)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)) if hasattr(x, "nbytes"))
    print(json.dumps(dict(way=way, peak_mb=_status_mb("VmHWM") - base, base_mb=base, model_mb=nbytes / 2**20)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--child", nargs=2)
    args = ap.parse_args()
    if args.child:
        return _child(*args.child)
    import torch
    import transformers
    with tempfile.TemporaryDirectory() as tmp:
        config = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                                          intermediate_size=int(args.hidden * 2.75), num_hidden_layers=args.layers,
                                          num_attention_heads=8, num_key_value_heads=8)
        transformers.LlamaForCausalLM(config).to(torch.float32).save_pretrained(tmp)
        del config
        print(f"llama hidden={args.hidden} layers={args.layers} vocab={args.vocab}, float32, one CPU device")
        for way in ("loop", "direct", "stack-all"):
            out = subprocess.run([sys.executable, __file__, "--child", way, tmp], capture_output=True, text=True,
                                 env={"JAX_PLATFORMS": "cpu", **__import__("os").environ})
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{way:10s} model {r['model_mb']:8.1f} MB  peak RSS above baseline {r['peak_mb']:8.1f} MB "
                  f"= {r['peak_mb'] / r['model_mb']:.2f}x the model")


if __name__ == "__main__":
    main()
