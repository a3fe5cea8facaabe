"""Per-op time of one jlora LoRA train step (XLA:CPU), from a jax.profiler trace.

    python benchmarks/profile_step.py --config 135m --dtype f32             # the default path
    python benchmarks/profile_step.py --config 135m --dtype bf16 --path plain   # the plain jnp reference

Builds a random model of the config's shape (benchmarks/train_step.py's CONFIGS), adapters r=16 on the
seven projections, and jlora's jitted train step; traces `--steps` steps after a warm-up with
`jax.profiler.trace(create_perfetto_trace=True)`, and sums the duration of each XLA thunk (one per
compiled HLO instruction: a dot, a fusion, a copy, ...) over the traced steps. Each instruction is
classified from the compiled HLO text: "dot" (a dot or a fusion around one, with its operand dtypes),
"elementwise/reduce fusion", "copy/transpose", "convert", and so on. Prints ms per step by class and
the top instructions with their shapes.

Times are wall time of thunks on the XLA:CPU runtime's threads; where two thunks overlap (inter-op
parallelism) both count, so the total can exceed the step time.
"""
from __future__ import annotations

import os

os.environ.setdefault("JLORA_KEEP_HOST_MEMORY", "1")  # as `jlora train` runs (jlora/host_malloc.py)
import jlora  # noqa: F401  (before jax and numpy: see jlora/host_malloc.py)

import argparse
import collections
import glob
import gzip
import json
import re
import sys
import tempfile
import time

if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_DTYPES = re.compile(r"\b(bf16|f16|f32|f64|s32|u8|pred)\[")


def parse_hlo(text: str):
    """{instruction: (opcode, result type, operand text)} and {computation: [its instruction lines]}."""
    instrs, comps, current = {}, collections.defaultdict(list), None
    for line in text.splitlines():
        m = _COMP.match(line)
        if m and "=" not in line.split("{")[0]:
            current = m.group(1)
            continue
        m = _INSTR.match(line)
        if m:
            name, rtype, op, rest = m.groups()
            instrs[name] = (op, rtype, rest)
            if current:
                comps[current].append((op, rtype, rest))
    return instrs, comps


def classify(name: str, instrs, comps) -> str:
    base = name.split(":")[0].strip()
    if base not in instrs:
        return "other"
    op, rtype, rest = instrs[base]
    called = _CALLS.findall(rest)
    inner = [i for c in called for i in comps.get(c, [])]
    dots = [i for i in ([(op, rtype, rest)] + inner) if i[0] in ("dot", "convolution")]
    if dots:
        d_op, d_type, d_rest = dots[0]
        names = re.findall(r"%([\w.\-]+)", d_rest.split(")")[0])[:2]
        operands = "x".join(_DTYPES.findall(instrs[n][1])[0] for n in names
                            if n in instrs and _DTYPES.findall(instrs[n][1])) or "?"
        return f"dot {operands}->{_DTYPES.findall(d_type)[0] if _DTYPES.findall(d_type) else '?'}"
    if op == "fusion":
        kinds = {i[0] for i in inner}
        if "reduce" in kinds:
            return "fusion (reduce)"
        if kinds & {"transpose", "copy"} and not kinds - {"transpose", "copy", "parameter", "bitcast",
                                                          "reshape", "convert"}:
            return "fusion (copy/transpose)"
        return "fusion (elementwise)"
    if op in ("copy", "transpose"):
        return "copy/transpose"
    return op


def source_of(base: str, instrs) -> str:
    """The op_name metadata of an instruction without the step's outer scopes: where in jlora it came from."""
    m = re.search(r'op_name="([^"]*)"', instrs[base][2]) if base in instrs else None
    if not m:
        return "(no op_name: layout copy)"
    src = re.sub(r"^jit\(step\)/(while/body/)?(closed_call/)?", "", m.group(1))
    return re.sub(r"\d+", "", src)[-90:]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="135m")
    ap.add_argument("--dtype", default="f32", choices=("f32", "bf16"))
    ap.add_argument("--path", default="default", choices=("default", "plain"),
                    help="default: the model as built; plain: jlora.use_kernels(model, None)")
    ap.add_argument("--scan", action="store_true",
                    help="scan the decoder layers (jlora.models.stacked.stack_layers: what `jlora train` does by default)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jlora.llama_config import LlamaConfig
    from jlora.train.optimizer import learning_rate_schedule, make_optimizer
    from jlora.train.state import SplitModel
    from jlora.train.step import make_train_step

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from train_step import CONFIGS, TARGETS, cpu_flags, cpu_model  # pylint: disable=import-outside-toplevel
    sys.path.pop(0)

    c = CONFIGS[args.config]
    config = LlamaConfig(vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["intermediate"],
                         num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
                         num_key_value_heads=c["kv_heads"], head_dim=c["hidden"] // c["heads"],
                         tie_word_embeddings=c["tied"])
    dtype = {"f32": "float32", "bf16": "bfloat16"}[args.dtype]
    model = jlora.init_random(config, dtype=dtype)
    model = jlora.get_peft_model(model, jlora.LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS),
                                 rngs=nnx.Rngs(0))
    if args.path == "plain":
        jlora.use_kernels(model, None)
    if args.scan:
        from jlora.models.stacked import stack_layers  # pylint: disable=import-outside-toplevel
        model = stack_layers(model)
    split = SplitModel.of(model)
    params, frozen = split.params(), split.frozen
    del model
    tx = make_optimizer(learning_rate_schedule(2e-4, 1000, 0))
    opt = tx.init(params)
    step = jax.jit(make_train_step(split, tx))
    b, t = c["batch"], c["seq"]
    ids = jax.random.randint(jax.random.key(0), (1, b, t + 1), 0, c["vocab"], jnp.int32)
    batch = {"inputs": ids[:, :, :t], "targets": ids[:, :, 1:], "loss_mask": jnp.ones((1, b, t), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (1, b, t)),
             "segment_ids": jnp.ones((1, b, t), jnp.int32)}
    key = jax.random.key(0)
    compiled = step.lower(params, opt, frozen, batch, key, jnp.asarray(0)).compile()
    instrs, comps = parse_hlo(compiled.as_text())

    def run():
        out = compiled(params, opt, frozen, batch, key, jnp.asarray(0))
        jax.block_until_ready(out)

    run()
    t0 = time.perf_counter()
    run()
    untraced = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(args.steps):
                run()
        path = glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)[0]
        with gzip.open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    per_instr = collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and name.split(":")[0].strip() in instrs:
            per_instr[name] += e.get("dur", 0) / 1e3 / args.steps  # ms per step
    per_class = collections.Counter()
    for name, ms in per_instr.items():
        per_class[classify(name, instrs, comps)] += ms
    total = sum(per_class.values())
    print(f"{args.config} {args.dtype} path={args.path}: batch {b} x seq {t}; one untraced step "
          f"{untraced * 1e3:.0f} ms; thunk time {total:.0f} ms/step over {len(per_instr)} instructions "
          f"({args.steps} traced steps); cpu {cpu_model()}, flags {cpu_flags()}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}")
    print("| class | ms/step | share |\n| --- | ---: | ---: |")
    for cls, ms in per_class.most_common():
        print(f"| {cls} | {ms:.1f} | {100 * ms / total:.1f}% |")
    per_source = collections.Counter()
    for name, ms in per_instr.items():
        per_source[(source_of(name.split(":")[0].strip(), instrs), classify(name, instrs, comps))] += ms
    print(f"\nby source op (jit/transform path of the op, numbers dropped) and class, top {args.top}:\n"
          "| source op | class | ms/step | share |\n| --- | --- | ---: | ---: |")
    for (src, cls), ms in per_source.most_common(args.top):
        print(f"| {src} | {cls} | {ms:.1f} | {100 * ms / total:.1f}% |")
    print(f"\ntop {args.top} instructions:\n| instruction | class | result | ms/step | source op |\n"
          "| --- | --- | --- | ---: | --- |")
    for name, ms in per_instr.most_common(args.top):
        base = name.split(":")[0].strip()
        src = re.search(r'op_name="([^"]*)"', instrs[base][2])
        src = src.group(1).replace("jit(step)/", "")[-70:] if src else ""
        print(f"| {base} | {classify(name, instrs, comps)} | {instrs[base][1].split('{')[0]} | {ms:.1f} | {src} |")


if __name__ == "__main__":
    main()
