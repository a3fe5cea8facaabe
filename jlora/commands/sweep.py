"""`jlora sweep --ranks 4,8,16,32`: train each rank on the same data, seed and budget; pick by eval loss."""
from __future__ import annotations

import sys

from jlora.commands.train_settings import add_train_flags, settings_from_args

SWEEP_DEFAULTS = {"out": "runs/sweep"}


def register(sub):
    from jlora.commands.help_format import examples
    p = sub.add_parser("sweep", help="train several LoRA ranks alike and recommend the one with the lowest "
                                     "eval loss (no --model: the embedded default)",
                       epilog=examples("jlora sweep --ranks 4,8,16 --steps 100       # the embedded default",
                                       "jlora sweep --model path/to/base --data train.jsonl --eval eval.jsonl "
                                       "--ranks 8,16,32,64 --alpha-ratio 2 --steps 500"))
    p.add_argument("--ranks", default="4,8,16,32", help="comma-separated ranks to train (default 4,8,16,32)")
    p.add_argument("--alpha-ratio", type=float, default=None,
                   help="lora_alpha = ratio * r for every rank (default: the train settings' lora_alpha / r: "
                        "1, or 2 on the embedded default); --lora-alpha fixes alpha instead")
    add_train_flags(p, skip=("r",), defaults=SWEEP_DEFAULTS)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from pathlib import Path

    from jlora.convert.safetensors_io import CheckpointError
    from jlora.data import DataError
    from jlora.ranks.sweep import embedded_default, parse_ranks, run_sweep
    from jlora.train.trainer import RunDirError, TrainingStopped

    try:
        ranks = parse_ranks(args.ranks)
        base, chosen = settings_from_args(args, skip=("r",), defaults=SWEEP_DEFAULTS, demo=False)
        if args.alpha_ratio is not None and "lora_alpha" in chosen:
            raise ValueError("give --alpha-ratio (alpha = ratio * r) or --lora-alpha (one alpha for every r), "
                             "not both")
        out = Path(base.out)
        if base.model is None and base.data is None:
            base = embedded_default(base, out, chosen)
        lora_alpha = base.lora_alpha if "lora_alpha" in chosen else None
        report = run_sweep(base, ranks, out, alpha_ratio=args.alpha_ratio, lora_alpha=lora_alpha)
    except (RunDirError, DataError, CheckpointError, TrainingStopped, ValueError) as e:
        print(f"jlora sweep: error: {e}", file=sys.stderr)
        return 2
    print()
    print(f"{'r':>5} {'lora_alpha':>10} {'trainable':>12} {'train loss':>11} {'eval loss':>10}")
    for run in report["runs"]:
        trainable = f"{run['trainable_params']:,}" if run["trainable_params"] is not None else "?"
        mark = "  <- lowest eval loss" if run["r"] == report["recommended_r"] else ""
        print(f"{run['r']:>5} {run['lora_alpha']:>10g} {trainable:>12} {run['train_loss']:>11.4f} "
              f"{run['eval_loss']:>10.4f}{mark}")
    print(f"\nrecommended: r={report['recommended_r']} (lowest eval loss {report['best_eval_loss']:.4f})")
    for flag in report["flags"]:
        print(f"warning: {flag}")
    if not report["flags"]:
        print("no overfitting seen (no eval loss rising while train loss falls)")
    print(f"sweep.json: {out / 'sweep.json'}\nplot: {report['plot']}")
    return 0
