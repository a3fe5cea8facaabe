"""`jlora train`: fine-tune a LoRA adapter (no --model: the embedded tiny default)."""
from __future__ import annotations

import argparse
import dataclasses
import sys

import yaml

from jlora.train.config import DEMO_SETTINGS as DEMO
from jlora.train.config import TrainConfig



def register(sub):
    p = sub.add_parser("train", help="fine-tune a LoRA adapter (no --model: the embedded tiny default)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="YAML file of settings; flags given here override it")
    types = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name, f in types.items():
        flag = "--" + name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.type in ("bool",) or isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"(default {default})")
        else:
            kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(f.type), str)
            p.add_argument(flag, type=kind, default=None, help=f"(default {default})")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from jlora.data import DataError
    from jlora.train.trainer import NonFiniteLoss, RunDirError, Trainer
    from jlora.convert.safetensors_io import CheckpointError

    given = {k: v for k, v in vars(args).items() if k not in ("command", "config", "func") and v is not None}
    try:
        config = TrainConfig.from_yaml(args.config, **given) if args.config else TrainConfig(**given)
        chosen = set(given) | (set(yaml.safe_load(open(args.config)) or {}) if args.config else set())
    except (OSError, ValueError, TypeError) as e:
        print(f"jlora train: error: {e}", file=sys.stderr)
        return 2
    if config.model is None and config.data is None:
        config = dataclasses.replace(config, **{k: v for k, v in DEMO.items() if k not in chosen})
    try:
        Trainer(config).run()
    except (RunDirError, DataError, CheckpointError, NonFiniteLoss, ValueError) as e:
        print(f"jlora train: error: {e}", file=sys.stderr)
        return 2 if not isinstance(e, NonFiniteLoss) else 3
    return 0
