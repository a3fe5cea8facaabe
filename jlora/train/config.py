"""Every setting of a training run, with the defaults `jlora train` uses; loadable from YAML; checked up front.

Each field is checked when a `TrainConfig` is built (type, range, allowed values), so a bad setting fails
before any file is touched, with an error naming the flag: `--steps 0: expected an integer >= 1 ...`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import yaml

from jlora.module_patterns import HEAD_MODULES, head_module


# Settings of the embedded-default demo (tiny random base, bundled data) unless the user chose otherwise:
# a higher learning rate and alpha = 2r so the loss falls to well under half in ~1 minute on a CPU.
DEMO_SETTINGS = dict(r=16, lora_alpha=32, lr=3e-3, steps=150, batch_size=16, seq_len=64, packing=True,
                     dtype="float32", eval_every=25, save_every=50, warmup_steps=10, sample_every=50)

DTYPES = ("float32", "bfloat16", "float16")
REMAT_CHOICES = ("none", "dots", "full", "offload", "auto")  # jlora.remat.POLICIES + auto
ATTENTION_CHOICES = ("auto", "blockwise", "reference", "splash", "cudnn", "flash")  # jlora.attention.BACKENDS
LOSS_CHUNK_TOKENS = 2048  # jlora.train.chunked_loss.DEFAULT_CHUNK_TOKENS (not imported: no jax for --help)

# One line of help per setting (the CLI's --help; the README's flag list says the same).
HELP = {
    "out": "run directory: metrics.jsonl, checkpoints/, adapter/, loss.png",
    "model": "HF checkpoint dir or Hub id; unset: the embedded default (tiny Llama + bundled data, demo settings)",
    "data": "training data: JSONL (text | prompt+completion | messages per line), .parquet, .csv or a datasets "
            "save_to_disk dir",
    "eval": "eval data (same formats); unset: hold out --eval-fraction of --data",
    "text_field": "column of --data/--eval holding the text field",
    "prompt_field": "column holding the prompt field",
    "completion_field": "column holding the completion field",
    "messages_field": "column holding the messages field (a list of {role, content})",
    "eval_fraction": "share of --data held out for eval when --eval is not given (needs >= 20 examples)",
    "r": "LoRA rank",
    "lora_alpha": "LoRA alpha: scaling = alpha / r (alpha / sqrt(r) with --use-rslora)",
    "lora_dropout": "dropout on the LoRA input",
    "use_rslora": "scale by alpha / sqrt(r)",
    "use_dora": "DoRA (PEFT's use_dora): a trained magnitude per output feature rescales W + s B A; vLLM cannot "
                "serve DoRA adapters (export the merged model: jlora export RUN --out DIR --merge)",
    "targets": "all-linear | attention | qv | mlp | comma-separated module names",
    "modules_to_save": "train full copies of these modules: embed_tokens,lm_head (PEFT's modules_to_save; tied "
                       "embeddings: one copy serves both)",
    "trainable_token_indices": "train only these token rows, e.g. 128000,128001 (embed_tokens, and a tied head), "
                               "or embed_tokens=1,2;lm_head=1,2 (PEFT's trainable_token_indices)",
    "lr": "peak learning rate (AdamW)",
    "lr_schedule": "cosine | linear | constant, after linear warmup",
    "warmup_steps": "linear warmup steps",
    "weight_decay": "AdamW weight decay",
    "max_grad_norm": "global-norm gradient clipping (0: none)",
    "steps": "optimizer steps; unset: --epochs over the data",
    "epochs": "passes over the data when --steps is unset",
    "batch_size": "rows per micro-batch (global, over all devices)",
    "grad_accum": "micro-batches per optimizer step (exact accumulation)",
    "seq_len": "tokens per row; longer examples are truncated and counted",
    "packing": "pack several examples per row (attention and positions reset per example)",
    "dtype": "compute and base-weight dtype: float32 | bfloat16 | float16 (adapters stay float32)",
    "remat": "what each layer's backward recomputes: none | dots (keep the projections' outputs) | full (keep "
             "only the layer input) | offload (the layer input in host memory; TPU/GPU) | auto (the first of "
             "none, dots, full, offload that fits, per jlora plan's estimate; none on CPU); a bare --remat means full",
    "attention": "attention backend: auto | blockwise | reference | splash (TPU) | cudnn | flash (GPU); auto: the best "
                 "available here",
    "loss_chunk_tokens": "logits of about this many tokens exist at once in the loss (0: all at once)",
    "loraplus_lr_ratio": "LoRA+: lora_B (and 1-D adapters) learn at lr x this ratio; unset: plain AdamW",
    "quantize": "nf4: QLoRA (base weights in NF4)",
    "kernels": "fused LoRA kernels: auto | xla | pallas | triton; unset: the default path (custom VJP over XLA dots)",
    "scan_layers": "scan the decoder layers (stacked on a layer axis: one compiled layer for any depth); unset: "
                   "auto, scan on accelerators unless a setting needs the loop (--lora-dropout > 0); the loop on CPU, "
                   "where it runs faster",
    "mesh": "device mesh, e.g. data=2,fsdp=2,tensor=2; unset: all devices on data",
    "seed": "seed of the adapter init, dropout and data order",
    "log_every": "write metrics.jsonl every N steps",
    "eval_every": "eval loss every N steps (0: never)",
    "save_every": "checkpoint every N steps (0: only at the end)",
    "keep_checkpoints": "checkpoints kept (the latest N)",
    "sample_every": "greedy answers to a few prompts every N steps, before the first and at the end, in "
                    "<out>/samples.jsonl; before/after printed at the end (0: never)",
    "sample_prompts": "JSONL of sample prompts ({\"prompt\": ...} or {\"messages\": [...]}); unset: the first "
                      "eval prompts",
    "resume": "continue the run in --out from its latest checkpoint",
    "force": "with --resume: accept settings that differ from the run's run_config.json",
    "overwrite": "replace the run in --out (the old run is kept in <out>.previous until the first checkpoint)",
    "merge": "also write the merged model to <out>/merged",
    "progress": "show a progress bar",
    "report_to": "also send metrics.jsonl's records to: tensorboard (event files in <out>/tensorboard) | wandb "
                 "(Weights & Biases; WANDB_MODE=offline keeps it local) | none; a comma list for several",
}

# `jlora train --help` lists the flags in these groups, in this order; every TrainConfig field is in exactly one
# (tests/commands/test_help.py checks it: a new field needs a HELP line and a place here).
GROUPS = {
    "model and data": ("model", "data", "eval", "eval_fraction", "text_field", "prompt_field", "completion_field",
                       "messages_field", "packing"),
    "LoRA": ("r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "targets", "modules_to_save",
             "trainable_token_indices"),
    "optimisation": ("lr", "lr_schedule", "warmup_steps", "weight_decay", "max_grad_norm", "loraplus_lr_ratio",
                     "steps", "epochs", "batch_size", "grad_accum"),
    "long context and memory": ("seq_len", "dtype", "quantize", "remat", "attention", "loss_chunk_tokens",
                                "kernels", "scan_layers"),
    "parallelism": ("mesh",),
    "output and logging": ("out", "log_every", "report_to", "eval_every", "save_every", "keep_checkpoints",
                           "sample_every", "sample_prompts", "resume", "force", "overwrite", "merge", "progress"),
    "other": ("seed",),
}


class ConfigError(ValueError):
    """A setting of the wrong type or out of range; the message names the flag (or the YAML file and key)."""


@dataclasses.dataclass
class TrainConfig:
    out: str = "runs/demo"
    model: str | None = None          # HF checkpoint dir; None: the embedded default (tiny Llama + bundled data)
    data: str | None = None           # JSONL with text | prompt+completion | messages
    eval: str | None = None           # JSONL; None: hold out eval_fraction of the data
    eval_fraction: float = 0.05
    text_field: str = "text"          # dataset columns holding jlora's fields (jlora.data.readers.Columns)
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    # LoRA
    r: int = 16
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False            # DoRA (jlora.dora): a magnitude vector per adapted projection
    targets: str = "all-linear"       # all-linear | attention | qv | mlp | comma-separated module names
    modules_to_save: str | None = None          # "embed_tokens,lm_head": full trained copies
    trainable_token_indices: str | None = None  # "1,2" | "embed_tokens=1,2;lm_head=1,2": trained rows only
    # optimisation
    lr: float = 2e-4
    lr_schedule: str = "cosine"       # cosine | linear | constant
    warmup_steps: int = 5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    loraplus_lr_ratio: float | None = None  # LoRA+ (jlora.train.optimizer): B learns at lr x ratio
    steps: int | None = None          # optimizer steps; None: epochs over the data
    epochs: float = 1.0
    batch_size: int = 8               # rows per micro-batch (global)
    grad_accum: int = 1
    seq_len: int = 512
    packing: bool = False
    dtype: str = "bfloat16"           # compute and base-weight dtype; adapters stay float32
    remat: str = "none"               # none | dots | full | offload | auto (jlora.remat; True/False: full/none)
    attention: str = "auto"           # auto | blockwise | reference | splash | cudnn | flash (jlora.attention)
    loss_chunk_tokens: int = LOSS_CHUNK_TOKENS  # 0: the whole logits at once (jlora.train.chunked_loss)
    quantize: str | None = None       # "nf4": QLoRA
    kernels: str | None = None        # fused LoRA kernels: auto | xla | pallas | triton; None: the default path
    scan_layers: bool | None = None   # None: auto (jlora.train.scan_layers: scan on accelerators unless a setting needs the loop)
    # parallelism
    mesh: str | None = None           # e.g. "data=2,fsdp=2,tensor=2"; default all devices on data
    # bookkeeping
    seed: int = 0
    log_every: int = 1
    eval_every: int = 50
    save_every: int = 100
    keep_checkpoints: int = 3
    sample_every: int = 0             # greedy samples every N steps in <out>/samples.jsonl (jlora.train.samples)
    sample_prompts: str | None = None  # JSONL of prompts; None: the first eval prompts
    resume: bool = False
    force: bool = False               # --resume although settings differ from run_config.json
    overwrite: bool = False
    merge: bool = False
    progress: bool = True
    report_to: str = "none"           # tensorboard | wandb | none, comma list (jlora.train.reporters)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            try:
                setattr(self, f.name, check_setting(f.name, getattr(self, f.name)))
            except ConfigError as e:
                raise ConfigError(f"{flag(f.name)} {getattr(self, f.name)!r}: {e}") from None
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite exclude each other: continue the run in --out, or "
                              "replace it")

    @classmethod
    def read_yaml(cls, path: str | Path) -> dict[str, Any]:
        """The settings in a YAML file, each checked; errors name the file (and line for YAML syntax)."""
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"--config {path}: cannot read it ({e.strerror or e})") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{where}: not valid YAML ({problem})") from None
        data = data or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of TrainConfig fields, found {type(data).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(map(str, data)) - set(known))
        if unknown:
            raise ConfigError(f"{path}: unknown settings {unknown}; known: {sorted(known)}")
        checked = {}
        for name, value in data.items():
            try:
                checked[name] = check_setting(name, value)
            except ConfigError as e:
                raise ConfigError(f"{path}: {name}: {value!r}: {e}") from None
        return checked

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        return cls(**{**cls.read_yaml(path), **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        """The settings that shape the run, `name=value` on one line (printed at the start of every run)."""
        skip = ("out", "resume", "force", "overwrite", "progress")
        return " ".join(f"{f.name}={_show(getattr(self, f.name))}" for f in dataclasses.fields(self)
                        if f.name not in skip and not (getattr(self, f.name) is None and f.default is None))


def with_demo_settings(config: TrainConfig, chosen: set[str]) -> TrainConfig:
    """The embedded default (no --model, no --data) trains with DEMO_SETTINGS except where the user chose."""
    if config.model is not None or config.data is not None:
        return config
    return dataclasses.replace(config, **{k: v for k, v in DEMO_SETTINGS.items() if k not in chosen})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# -- per-setting checks --------------------------------------------------------------------------------
_AT_LEAST = {"r": 1, "steps": 1, "batch_size": 1, "grad_accum": 1, "seq_len": 2, "log_every": 1,
             "keep_checkpoints": 1, "warmup_steps": 0, "seed": 0, "eval_every": 0, "save_every": 0,
             "weight_decay": 0.0, "max_grad_norm": 0.0, "loss_chunk_tokens": 0, "sample_every": 0}
_ABOVE = {"lr": 0.0, "lora_alpha": 0.0, "epochs": 0.0, "loraplus_lr_ratio": 0.0}
_BELOW_ONE = ("eval_fraction", "lora_dropout")   # in [0, 1)
_CHOICES = {"lr_schedule": ("cosine", "linear", "constant"), "dtype": DTYPES, "quantize": ("nf4",),
            "kernels": ("auto", "xla", "pallas", "triton"), "remat": REMAT_CHOICES, "attention": ATTENTION_CHOICES}
_NOTES = {"steps": " (or leave it unset to train --epochs)", "eval_every": " (0: never)",
          "save_every": " (0: only at the end)", "max_grad_norm": " (0: no clipping)",
          "loss_chunk_tokens": " (0: the whole logits at once)", "sample_every": " (0: never)"}
_KINDS = {f.name: f.type for f in dataclasses.fields(TrainConfig)}


def check_setting(name: str, value: Any) -> Any:
    """`value` for setting `name`, converted where unambiguous (a path to str, a numeric string to float:
    PyYAML reads `2e-4` as a string; an int stays an int); raises ConfigError saying what was expected."""
    kind = str(_KINDS[name])
    optional = kind.endswith("| None")
    kind = kind.split("|")[0].strip()
    if name == "remat" and isinstance(value, bool):
        value = "full" if value else "none"  # run_config.json and YAML files from before the policies
    if value is None:
        if optional:
            return None
        raise ConfigError(f"expected {_describe(kind)}, found nothing")
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"expected true or false, found {type(value).__name__}")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"expected an integer, found {type(value).__name__}")
    elif kind == "float":
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError("expected a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"expected a number, found {type(value).__name__}")
        if not math.isfinite(value):
            raise ConfigError("expected a finite number")
    else:  # str
        if name == "targets" and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            value = ",".join(value)  # YAML `targets: [q_proj, v_proj]`
        if name in TRAINABLE_EMBEDDING_SETTINGS and isinstance(value, (list, tuple, dict)):  # YAML list / mapping
            value = json.dumps(value) if isinstance(value, dict) else ",".join(str(v) for v in value)
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str):
            raise ConfigError(f"expected a string, found {type(value).__name__}")
        if not value.strip():
            raise ConfigError("expected a non-empty string")
    note = _NOTES.get(name, "")
    if name in _AT_LEAST and value < _AT_LEAST[name]:
        raise ConfigError(f"expected {_describe(kind)} >= {_AT_LEAST[name]:g}{note}")
    if name in _ABOVE and value <= _ABOVE[name]:
        raise ConfigError(f"expected {_describe(kind)} > {_ABOVE[name]:g}")
    if name in _BELOW_ONE and not 0 <= value < 1:
        raise ConfigError(f"expected {_describe(kind)} in [0, 1)")
    if name == "report_to":
        from jlora.train import reporters
        try:
            value = ",".join(reporters.parse(value)) or "none"
        except reporters.ReporterError as e:
            raise ConfigError(str(e)) from None
    if name in TRAINABLE_EMBEDDING_SETTINGS:
        TRAINABLE_EMBEDDING_SETTINGS[name](value)  # raises ConfigError on a malformed value
    if name in _CHOICES and value not in _CHOICES[name]:
        raise ConfigError(f"expected one of {', '.join(_CHOICES[name])}" + (" (or unset)" if optional else ""))
    return value


def _show(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def modules_to_save_setting(text: str) -> list[str]:
    """'embed_tokens,lm_head' -> ['embed_tokens', 'lm_head'] (LoraConfig.modules_to_save)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if head_module(n) is None]
    if bad or not names:
        raise ConfigError(f"expected a comma list of {', '.join(HEAD_MODULES)}; found {bad or text!r}")
    return names


def _ids(text: str, where: str) -> list[int]:
    parts = [t.strip() for t in str(text).strip("[]").split(",") if t.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise ConfigError(f"expected token ids (integers >= 0, comma-separated){where}, found {text!r}")
    return [int(p) for p in parts]


def token_indices_setting(text: str) -> list[int] | dict[str, list[int]]:
    """LoraConfig.trainable_token_indices from '1,2' (embed_tokens, and a tied head), 'embed_tokens=1,2;lm_head=3'
    or a JSON object {"embed_tokens": [1, 2]}."""
    text = text.strip()
    if text.startswith("{"):
        try:
            pairs = {k: ",".join(map(str, v)) for k, v in json.loads(text).items()}
        except (ValueError, TypeError, AttributeError):
            raise ConfigError(f"expected a JSON object of module: [token ids], found {text!r}") from None
    elif "=" in text:
        pairs = dict(p.split("=", 1) for p in text.split(";") if p.strip())
    else:
        return _ids(text, "")
    out = {}
    for module, ids in pairs.items():
        module = module.strip()
        if head_module(module) is None:
            raise ConfigError(f"{module!r} is not a module whose rows can train; expected "
                              f"{', '.join(HEAD_MODULES)}")
        out[module] = _ids(ids, f" for {module}")
    return out


TRAINABLE_EMBEDDING_SETTINGS = {"modules_to_save": modules_to_save_setting,
                                "trainable_token_indices": token_indices_setting}


def _describe(kind: str) -> str:
    return {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}[kind]
