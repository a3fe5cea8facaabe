"""Every setting of a training run, with the defaults `jlora train` uses; loadable from YAML."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml


# Settings of the embedded-default demo (tiny random base, bundled data) unless the user chose otherwise:
# a higher learning rate and alpha = 2r so the loss falls to well under half in ~1 minute on a CPU.
DEMO_SETTINGS = dict(r=16, lora_alpha=32, lr=3e-3, steps=150, batch_size=16, seq_len=64, packing=True,
                     dtype="float32", eval_every=25, save_every=50, warmup_steps=10)


@dataclasses.dataclass
class TrainConfig:
    out: str = "runs/demo"
    model: str | None = None          # HF checkpoint dir; None: the embedded default (tiny Llama + bundled data)
    data: str | None = None           # JSONL with text | prompt+completion | messages
    eval: str | None = None           # JSONL; None: hold out eval_fraction of the data
    eval_fraction: float = 0.05
    # LoRA
    r: int = 16
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    use_rslora: bool = False
    targets: str = "all-linear"       # all-linear | attention | qv | mlp | comma-separated module names
    # optimisation
    lr: float = 2e-4
    lr_schedule: str = "cosine"       # cosine | linear | constant
    warmup_steps: int = 5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    steps: int | None = None          # optimizer steps; None: epochs over the data
    epochs: float = 1.0
    batch_size: int = 8               # rows per micro-batch (global)
    grad_accum: int = 1
    seq_len: int = 512
    packing: bool = False
    dtype: str = "bfloat16"           # compute and base-weight dtype; adapters stay float32
    remat: bool = False
    quantize: str | None = None       # "nf4": QLoRA
    kernels: str | None = None        # fused LoRA kernels: auto | xla | pallas | triton; None: plain jnp
    # parallelism
    mesh: str | None = None           # e.g. "data=2,fsdp=2,tensor=2"; default all devices on data
    # bookkeeping
    seed: int = 0
    log_every: int = 1
    eval_every: int = 50
    save_every: int = 100
    keep_checkpoints: int = 3
    resume: bool = False
    overwrite: bool = False
    merge: bool = False
    progress: bool = True

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of TrainConfig fields, found {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown settings {unknown}; known: {sorted(known)}")
        return cls(**{**data, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
