"""Merged export: a transformers checkpoint whose projections are W + scaling * B @ A.

In Flax orientation kernel' = kernel + scaling * A @ B (computed in float32, cast to the model dtype),
written as HF `weight = kernel'^T`, with config.json and the source's tokenizer files.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from jlora.convert.hf_names import tensor_map, variable_at
from jlora.convert.safetensors_io import write_atomic, write_text_atomic
from jlora.llama import LlamaForCausalLM

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")
SHARD_BYTES = 5 * 1024**3


def merged_tensors(model: LlamaForCausalLM):
    """(HF name, numpy array in the model dtype) for every tensor, LoRA folded into its projection."""
    for name, entry in tensor_map(model.config).items():
        var = variable_at(model, entry.path)
        value = np.asarray(var[...])
        if entry.path[-1] == "kernel":
            linear = variable_at(model, entry.path[:-1])
            if linear.lora is not None:
                merged = value.astype(np.float32) + np.asarray(linear.lora.delta_kernel())
                value = merged.astype(value.dtype)
        yield name, value.T if entry.transpose else value


def save_merged(model: LlamaForCausalLM, out_dir, *, shard_bytes: int = SHARD_BYTES) -> Path:
    """Writes model.safetensors (sharded with an index above `shard_bytes`), config.json, tokenizer files."""
    out_dir = Path(out_dir)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, value in merged_tensors(model):
        if size and size + value.nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.nbytes
    if len(shards) == 1:
        write_atomic(out_dir / "model.safetensors", shards[0], metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_atomic(out_dir / fname, shard, metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        total = sum(v.nbytes for s in shards for v in s.values())
        write_text_atomic(out_dir / "model.safetensors.index.json",
                          json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    hf = dict(model.config.hf_config)
    hf.pop("quantization_config", None)
    dtype_name = np.dtype(model.dtype).name
    hf["torch_dtype" if "torch_dtype" in hf else "dtype"] = dtype_name
    write_text_atomic(out_dir / "config.json", json.dumps(hf, indent=2, sort_keys=True) + "\n")
    source = getattr(model, "source_dir", None)
    if source:
        for f in TOKENIZER_FILES:
            if (Path(source) / f).exists():
                shutil.copy2(Path(source) / f, out_dir / f)
    return out_dir
