"""Opening a model directory for training: every check jlora can make runs before the tokenizer loads.

transformers' `AutoTokenizer.from_pretrained` on a broken directory fails far from the cause (a
missing tokenizer surfaces as a message about sentencepiece; a malformed config.json as a raw
JSONDecodeError). `open_model_dir` resolves `--model` (a local directory or a Hub id, see
`jlora.convert.hub`), reads config.json, checks the architecture, finds the weights and the
tokenizer files, and raises a one-line `CheckpointError`/`ConfigError` naming the file otherwise.
"""
from __future__ import annotations

from pathlib import Path

from jlora.convert.hf_checkpoint import read_config, weight_files
from jlora.convert.hub import resolve_model
from jlora.convert.safetensors_io import CheckpointError
from jlora.convert.tokenizer_files import TOKENIZER_MODEL_FILES
from jlora.llama_config import LlamaConfig


def open_model_dir(model, *, allow_pickle: bool = False) -> Path:
    """The checked local directory of `model` (path or Hub id): config, architecture, weights, tokenizer."""
    model_dir = resolve_model(model)
    hf = read_config(model_dir)
    LlamaConfig.from_hf_dict(hf, where=str(model_dir / "config.json"))
    weight_files(model_dir, allow_pickle=allow_pickle)
    if not any((model_dir / name).is_file() for name in TOKENIZER_MODEL_FILES):
        raise CheckpointError(f"{model_dir}: no tokenizer (expected one of {', '.join(TOKENIZER_MODEL_FILES)} "
                              "beside config.json; copy the tokenizer files of the base model there)")
    return model_dir


def load_tokenizer(model_dir: Path):
    """transformers' AutoTokenizer for a directory `open_model_dir` accepted; failures in one line."""
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; all mean "unusable tokenizer"
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{model_dir}: the tokenizer files could not be loaded by transformers "
                              f"({type(e).__name__}: {first})") from e
