"""`jlora train`: fine-tune a LoRA adapter (no --model: the embedded tiny default)."""
from __future__ import annotations

import sys

from jlora.commands.train_settings import add_train_flags, demo_note, settings_from_args


def register(sub):
    p = sub.add_parser("train", help="fine-tune a LoRA adapter (no --model: the embedded tiny default)",
                       description="Fine-tune a LoRA adapter. Without --model and --data: a tiny built-in "
                                   "Llama on a bundled dataset, with the demo settings the help names.")
    add_train_flags(p)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from jlora.convert.safetensors_io import CheckpointError
    from jlora.data import DataError
    from jlora.train.trainer import RunDirError, Trainer, TrainingStopped

    try:
        config, chosen = settings_from_args(args)
    except ValueError as e:
        print(f"jlora train: error: {e}", file=sys.stderr)
        return 2
    note = demo_note(config, chosen)
    if note:
        print(note)
    try:
        Trainer(config).run()
    except TrainingStopped as e:
        print(f"jlora train: error: {e}", file=sys.stderr)
        return 3
    except (RunDirError, DataError, CheckpointError, ValueError) as e:
        print(f"jlora train: error: {e}", file=sys.stderr)
        return 2
    return 0
