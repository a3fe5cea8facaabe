"""Load a local transformers checkpoint directory into a jlora model, streaming tensor by tensor.

Peak host memory is about one copy of the model in the target dtype plus one tensor: the model is
built abstractly (`nnx.eval_shape`), then each tensor is read, cast, transposed and placed.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jlora.convert.hf_names import IGNORED, tensor_map, variable_at
from jlora.convert.safetensors_io import CheckpointError, iter_tensors, read_header
from jlora.llama import LlamaForCausalLM, abstract_model
from jlora.llama_config import LlamaConfig

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: not a directory (expected a transformers checkpoint dir)")
    if not path.exists():
        raise CheckpointError(f"{model_dir}: no config.json (expected a transformers checkpoint dir with "
                              f"config.json and model.safetensors)")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from None


def weight_files(model_dir: Path, *, allow_pickle: bool) -> list[Path]:
    """The safetensors files of a checkpoint (single file or a sharded index), or .bin with opt-in."""
    single, index = (model_dir / n for n in WEIGHT_FILES)
    if single.exists():
        return [single]
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [model_dir / f for f in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index}: names shard files that do not exist: {missing}")
        return files
    pickles = [model_dir / n for n in PICKLE_FILES if (model_dir / n).exists()]
    if pickles:
        if not allow_pickle:
            raise CheckpointError(
                f"{model_dir}: has only pickle weights ({pickles[0].name}); loading pickles can run arbitrary code. "
                f"Convert to safetensors, or pass allow_pickle=True if you trust this file")
        return pickles
    raise CheckpointError(f"{model_dir}: no weights found (expected one of {list(WEIGHT_FILES)})")


def _iter_pickle(path: Path):
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: reading pickle weights needs torch (pip install torch)") from None
    files = [path]
    if path.name.endswith(".index.json"):
        files = [path.parent / f for f in dict.fromkeys(json.loads(path.read_text())["weight_map"].values())]
    for f in files:
        for name, t in torch.load(f, map_location="cpu", weights_only=True).items():
            yield name, t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def load_hf(model_dir, dtype="float32", *, allow_pickle: bool = False, quantize: str | None = None
            ) -> LlamaForCausalLM:
    """Reads a transformers Llama/Mistral/Qwen2 checkpoint dir into a `LlamaForCausalLM` in `dtype`.

    Unknown or missing tensors, wrong shapes, truncated files and pickle weights (without
    `allow_pickle=True`) are errors that name the file and tensor.
    """
    model_dir = Path(model_dir)
    hf = read_config(model_dir)
    if quantize is not None or hf.get("quantization_config"):
        from jlora.convert.quantized import load_quantized  # QLoRA path
        return load_quantized(model_dir, hf, dtype=dtype, quantize=quantize, allow_pickle=allow_pickle)
    config = LlamaConfig.from_hf_dict(hf, where=str(model_dir / "config.json"))
    files = weight_files(model_dir, allow_pickle=allow_pickle)
    model = abstract_model(config, dtype=dtype)
    fill_from_tensors(model, config, files, dtype)
    model.source_dir = str(model_dir.resolve())
    return model


def fill_from_tensors(model: LlamaForCausalLM, config: LlamaConfig, files: list[Path], dtype) -> None:
    """Places every tensor of `files` into the abstract `model`; errors name unknown/missing/misshapen ones."""
    expected = tensor_map(config)
    seen: set[str] = set()
    unknown: list[str] = []
    for path in files:
        if path.suffix == ".safetensors":
            read_header(path)  # truncation check before reading anything
            tensors = iter_tensors(path)
        else:
            tensors = _iter_pickle(path)
        for name, array in tensors:
            if IGNORED.match(name) or (name == "lm_head.weight" and config.tie_word_embeddings):
                continue
            entry = expected.get(name)
            if entry is None:
                unknown.append(name)
                continue
            var = variable_at(model, entry.path)
            want = entry.hf_shape(var.shape)
            if tuple(array.shape) != want:
                raise CheckpointError(f"{path}: tensor {name} has shape {tuple(array.shape)}, "
                                      f"config.json implies {want}")
            value = array.T if entry.transpose else array
            var.set_value(jnp.asarray(np.asarray(value).astype(jnp.dtype(var.dtype))))
            seen.add(name)
    if unknown:
        raise CheckpointError(f"{files[0].parent}: tensors that are not part of a {config.model_type} model: "
                              f"{sorted(unknown)[:20]}{' ...' if len(unknown) > 20 else ''}")
    missing = sorted(set(expected) - seen)
    if missing:
        raise CheckpointError(f"{files[0].parent}: checkpoint lacks tensors the config requires: "
                              f"{missing[:20]}{' ...' if len(missing) > 20 else ''}")
