"""`jlora ranks`: trainable parameters and memory per LoRA rank and target preset, then rank advice."""
from __future__ import annotations

import json
import sys


def register(sub):
    from jlora.commands.help_format import examples
    p = sub.add_parser("ranks", help="parameters and memory per LoRA rank x targets, and how to choose r",
                       epilog=examples("jlora ranks --model llama-3.1-8b --quantize nf4",
                                       "jlora ranks --model path/to/checkpoint --seq-len 4096 --batch-size 4 --json"))
    p.add_argument("--model", required=True, help="checkpoint dir (config.json is enough) or a preset, "
                                                 "e.g. llama-3.1-8b")
    p.add_argument("--quantize", choices=["nf4"], default=None, help="QLoRA: NF4 base projections")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per row for the activation estimate")
    p.add_argument("--batch-size", type=int, default=8, help="rows per micro-batch for the activation estimate")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="compute and base-weight dtype")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of the tables")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from jlora.llama_config import ConfigError
    from jlora.convert.safetensors_io import CheckpointError
    from jlora.ranks.advice import advice_lines
    from jlora.ranks.params import base_parameter_count, resolve_model
    from jlora.ranks.table import format_report, rank_rows

    if args.seq_len < 1 or args.batch_size < 1:
        print("jlora ranks: error: --seq-len and --batch-size must be positive", file=sys.stderr)
        return 2
    try:
        config, name = resolve_model(args.model)
    except (ValueError, ConfigError, CheckpointError) as e:
        print(f"jlora ranks: error: {e}", file=sys.stderr)
        return 2
    rows = rank_rows(config, batch=args.batch_size, seq=args.seq_len, dtype=args.dtype)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    lines = format_report(config, name, rows, batch=args.batch_size, seq=args.seq_len, dtype=args.dtype,
                          quantize=args.quantize)
    print("\n".join(lines + [""] + advice_lines(base_parameter_count(config))))
    return 0
