"""`jlora plan`: will a LoRA/QLoRA step fit a TPU slice (or GPUs), with which mesh and remat, and how fast.

    jlora plan --model llama-3.1-70b --topology v5e:8x8 --quantize nf4 --r 16 --batch-size 64 --seq-len 4096

Compiles the real sharded train step for the topology with libtpu (no TPU needed, no weights read) and
prints per-chip memory against HBM, FLOPs and HBM bytes per step, a roofline step time and its MFU.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def register(sub):
    from jlora.commands.help_format import examples
    p = sub.add_parser("plan", help="will a training step fit a TPU slice or GPUs; memory, mesh, step time",
                       description=__doc__.split("\n\n")[0].replace("\n", " "),
                       epilog=examples(
                           "jlora plan --model llama-3.1-8b --topology v5e:2x2 --quantize nf4 --batch-size 8 "
                           "--seq-len 4096",
                           "jlora plan --model llama-3.1-70b --topology v5p:2x2x4 --batch-size 16 --seq-len 8192 "
                           "--max-seq-len",
                           "jlora plan --model path/to/checkpoint --topology h100:8 --batch-size 8 --seq-len 2048 --json"))
    p.add_argument("--model", required=True, help="a preset name (e.g. llama-3.1-8b) or a checkpoint dir with config.json")
    p.add_argument("--topology", required=True,
                   help="TPU slice as libtpu names it (v4:2x2x2, v5e:4x4, v5p:2x2x4, v6e:8x8) or h100[:N] / h200[:N]")
    p.add_argument("--mesh", help="data=..,fsdp=..,tensor=.. over the slice's devices (default: fsdp as wide as "
                                  "the batch allows, the rest on tensor)")
    p.add_argument("--quantize", choices=["nf4"], help="QLoRA: NF4 frozen projections")
    p.add_argument("--r", type=int, default=16, help="LoRA rank")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: r; does not change memory or speed)")
    p.add_argument("--targets", default="all-linear", help="all-linear | attention | qv | mlp | module names")
    p.add_argument("--batch-size", type=int, required=True, help="rows per micro-batch (global)")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per row (with --max-seq-len: the search's "
                                                              "first guess)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--dtype", default="bfloat16", help="compute and base-weight dtype")
    p.add_argument("--remat", choices=["auto", "none", "dots", "full", "offload"], default="auto",
                   help="what each layer's backward recomputes (jlora.remat); auto: the first of none, full, "
                        "offload that fits (offload keeps layer inputs in host memory, reported apart); dots only "
                        "by name (it can hold more than none)")
    p.add_argument("--attention", choices=["auto", "blockwise", "reference", "splash", "cudnn"], default="auto",
                   help="attention backend as jlora train --attention; auto: splash on TPU, cudnn on GPUs")
    p.add_argument("--loss-chunk-tokens", type=int, default=2048,
                   help="logits of about this many tokens at once in the loss (0: the whole logits)")
    p.add_argument("--max-seq-len", action="store_true",
                   help="find the largest --seq-len that fits (estimate, then compiles bisect; --seq-len seeds "
                        "the estimate, --max-compiles bounds the compiles)")
    p.add_argument("--seq-len-multiple", type=int, default=1024, help="--max-seq-len answers in multiples of this")
    p.add_argument("--compile-effort", choices=["fast", "default"], default="fast",
                   help="fast: XLA's quick schedule (minutes less per compile; can show somewhat less temporary "
                        "memory); default: the schedule jlora train compiles with")
    p.add_argument("--max-compiles", type=int, default=2,
                   help="compiles a suggestion (or --max-seq-len) may spend checking itself")
    p.add_argument("--kernels", choices=["pallas", "xla", "auto"],
                   help="compile the step with the fused kernels (jlora train --kernels); pallas: Mosaic kernels")
    p.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=True,
                   help="compile the decoder layers as one scanned layer (compile time flat in depth, as jlora "
                        "train runs them); --no-scan-layers compiles the layer loop")
    p.add_argument("--no-suggest", action="store_true", help="do not search for a setting that fits")
    p.add_argument("--json", action="store_true", help="print one JSON object (fits, bytes_per_chip, ...)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    # libtpu only describes the topology: never probe for (or lock) a local TPU, and share libtpu with
    # any other process that holds /tmp/libtpu_lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # else libtpu logs an error off a TPU VM
    import jax
    if "JAX_PLATFORMS" not in os.environ:
        jax.config.update("jax_platforms", "cpu")

    from jlora.llama_config import ConfigError
    from jlora.plan.model import PlanError
    from jlora.plan.planner import PlanRequest, plan
    from jlora.plan.report import format_text, to_json

    request = PlanRequest(model=args.model, topology=args.topology, batch_size=args.batch_size,
                          seq_len=args.seq_len, mesh=args.mesh, quantize=args.quantize, r=args.r,
                          lora_alpha=args.lora_alpha, targets=args.targets, dtype=args.dtype, remat=args.remat,
                          grad_accum=args.grad_accum, effort=args.compile_effort, suggest=not args.no_suggest,
                          max_compiles=args.max_compiles, kernels=args.kernels, attention=args.attention,
                          loss_chunk_tokens=args.loss_chunk_tokens or None, max_seq_len=args.max_seq_len,
                          seq_len_multiple=args.seq_len_multiple, scan_layers=args.scan_layers)
    log = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    try:
        result = plan(request, log=log)
    except (PlanError, ConfigError, ValueError) as e:
        print(f"jlora plan: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(to_json(result), indent=2) if args.json else format_text(result))
    return 0
