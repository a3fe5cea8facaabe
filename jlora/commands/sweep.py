"""`jlora sweep --ranks 4,8,16,32`: train each rank on the same data, seed and budget; pick by eval loss."""
from __future__ import annotations

import argparse
import dataclasses
import sys

from jlora.train.config import TrainConfig

_TYPES = {"int": int, "float": float, "int | None": int, "float | None": float}


def register(sub):
    p = sub.add_parser("sweep", help="train several LoRA ranks alike and recommend the one with the lowest "
                                     "eval loss (no --model: the embedded default)")
    p.add_argument("--ranks", default="4,8,16,32", help="comma-separated ranks to train (default 4,8,16,32)")
    p.add_argument("--alpha-ratio", type=float, default=None,
                   help="lora_alpha = ratio * r for every rank (default: the train settings' lora_alpha / r: "
                        "1, or 2 on the embedded default); --lora-alpha fixes alpha instead")
    p.add_argument("--config", help="YAML file of train settings; flags given here override it")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "r":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = "runs/sweep" if f.name == "out" else f.default
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"(default {default})")
        else:
            p.add_argument(flag, type=_TYPES.get(str(f.type), str), default=None, help=f"(default {default})")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from pathlib import Path

    from jlora.convert.safetensors_io import CheckpointError
    from jlora.data import DataError
    from jlora.ranks.sweep import embedded_default, parse_ranks, run_sweep
    from jlora.train.trainer import NonFiniteLoss, RunDirError

    skip = ("command", "config", "func", "ranks", "alpha_ratio")
    given = {k: v for k, v in vars(args).items() if k not in skip and v is not None}
    try:
        ranks = parse_ranks(args.ranks)
        if args.alpha_ratio is not None and "lora_alpha" in given:
            raise ValueError("give --alpha-ratio (alpha = ratio * r) or --lora-alpha (one alpha for every r), "
                             "not both")
        base = TrainConfig.from_yaml(args.config, **given) if args.config else TrainConfig(**given)
        if "out" not in given and not (args.config and base.out != TrainConfig.out):
            base = dataclasses.replace(base, out="runs/sweep")
        out = Path(base.out)
        if base.model is None and base.data is None:
            base = embedded_default(base, out, set(given))
        lora_alpha = given.get("lora_alpha")
        report = run_sweep(base, ranks, out, alpha_ratio=args.alpha_ratio, lora_alpha=lora_alpha)
    except (RunDirError, DataError, CheckpointError, NonFiniteLoss, ValueError) as e:
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
