"""`jlora train`: fine-tune a LoRA adapter (no --model: the embedded tiny default)."""
from __future__ import annotations

import sys

from jlora.commands.help_format import examples
from jlora.commands.train_settings import add_train_flags, demo_note, settings_from_args


def register(sub):
    p = sub.add_parser("train", help="fine-tune a LoRA adapter (no --model: the embedded tiny default)",
                       description="Fine-tune a LoRA adapter. Without --model and --data: a tiny built-in "
                                   "Llama on a bundled dataset, with the demo settings the help names.",
                       epilog=examples(
                           "jlora train                  # the demo: tiny Llama, bundled data, ~1 min on a CPU",
                           "jlora train --model meta-llama/Llama-3.2-1B --data train.jsonl --out runs/x \\",
                           "    --r 16 --lora-alpha 32 --steps 500 --report-to tensorboard",
                           "jlora train --out runs/x --resume          # continue from the latest checkpoint",
                           "jlora train --config settings.yaml --lr 1e-4  # flags override the YAML"))
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
        config = resolve_auto_remat(config)
        Trainer(config).run()
    except TrainingStopped as e:
        print(f"jlora train: error: {e}", file=sys.stderr)
        return 3
    except (RunDirError, DataError, CheckpointError, ValueError) as e:
        print(f"jlora train: error: {e}", file=sys.stderr)
        return 2
    return 0


def resolve_auto_remat(config, log=print):
    """`--remat auto` on a TPU or GPU with --model: the first of none, full, offload that jlora plan's estimate
    fits in the device's memory (jlora.plan.auto_remat). On CPU, without --model, or where the device does not
    say its memory, the config is left as it is and the trainer decides (jlora.train.long_context)."""
    if config.remat != "auto" or not config.model:
        return config
    import dataclasses

    import jax

    from jlora.train import hosts
    hosts.initialize()  # before anything touches a JAX backend
    platform = jax.default_backend()
    if platform == "cpu":
        return config
    limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
    if not limit:
        return config
    from jlora.convert.model_dir import open_model_dir
    from jlora.plan.auto_remat import MARGIN, lightest_fitting_remat
    from jlora.plan.model import checkpoint_quantization, model_config
    from jlora.plan.report import gib
    from jlora.train.sharding import parse_mesh

    model_dir = str(open_model_dir(config.model))
    policy, estimates = lightest_fitting_remat(config, model_config(model_dir), device_bytes=limit,
                                               mesh_sizes=parse_mesh(config.mesh), platform=platform,
                                               quantize=checkpoint_quantization(model_dir))
    tried = ", ".join(f"{p} {gib(b)}" for p, b in estimates.items())
    fits = estimates[policy] <= MARGIN * limit
    log(f"--remat auto: {policy} (estimated per device: {tried}; {gib(limit)} on this {platform})"
        + ("" if fits else "; no policy is estimated to fit: the compile may run out of memory"))
    return dataclasses.replace(config, remat=policy)
