"""Merged export: a transformers checkpoint whose projections are W + scaling * B @ A.

In Flax orientation kernel' = kernel + scaling * A @ B (computed in float32, cast to the output dtype);
a DoRA projection is PEFT's merge, (m / ||W + s B A||) * (W + s B A) per output row (LoRA.merge_into),
written as HF `weight = kernel'^T`, with config.json and the source's tokenizer files. An NF4 projection
is dequantized first, as bitsandbytes does (to the dtype it was quantized from), so a QLoRA model
exports as a plain 16-bit checkpoint (Unsloth's `merged_16bit`) that transformers loads without
bitsandbytes. Trained embedding/head copies (`modules_to_save`) are written as they are, trained token
rows (`trainable_token_indices`) into their rows of the embedding and head (jlora/trainable_tokens.py).

Writes are whole-directory swaps (jlora.atomic_files.atomic_directory): the checkpoint is written into a
temporary sibling of `out_dir` and renamed into place, so `out_dir` holds exactly one complete export
(never a new sharded layout beside an old single file, which loaders would prefer), and a failure midway
leaves the previous contents untouched. A non-empty `out_dir` is replaced only when every entry in it is
a file a checkpoint export writes (CHECKPOINT_FILES, model shards, MODEL_SIDE_FILES); anything else is an
error naming it, so a mistyped path never deletes unrelated files.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Iterable

import jax.numpy as jnp
import numpy as np

from jlora.convert.hf_names import tensor_map, variable_at
from jlora.atomic_files import atomic_directory, write_json, write_text
from jlora.convert.safetensors_io import write_atomic
from jlora.convert.tokenizer_files import MODEL_SIDE_FILES
from jlora.dora import dense_weight
from jlora.llama import LlamaForCausalLM
from jlora.qlora import NF4Weight
from jlora.trainable_tokens import merged_rows

SHARD_BYTES = 5 * 1024**3
# What a checkpoint dir written by write_checkpoint (or transformers' save_pretrained) may hold, besides
# MODEL_SIDE_FILES (tokenizer files, generation_config.json); a directory holding only these is a previous
# export and may be replaced as a whole.
CHECKPOINT_FILES = re.compile(r"^(config\.json|model\.safetensors|model\.safetensors\.index\.json|"
                              r"model-\d+-of-\d+\.safetensors|pytorch_model(-\d+-of-\d+)?\.bin|"
                              r"pytorch_model\.bin\.index\.json)$")


def merged_tensors(model: LlamaForCausalLM, dtype=None):
    """(HF name, numpy array) for every tensor, LoRA folded into its projection and NF4 dequantized.

    Arrays are in `dtype`, else in their variable's dtype (an NF4 projection: the model's dtype).
    """
    for name, entry in tensor_map(model.config).items():
        var = variable_at(model, entry.path)
        linear = variable_at(model, entry.path[:-1]) if entry.path[-1] == "kernel" else None
        if isinstance(var, NF4Weight):
            w = dense_weight(var.get_value())  # float32 kernel [in, out], dequantized as bitsandbytes does
            if linear.lora is not None:
                w = linear.lora.merge_into(w)
            yield name, np.asarray(w).T.astype(jnp.dtype(dtype or model.dtype))
            continue
        value = np.asarray(var[...])
        out_dtype = jnp.dtype(dtype or value.dtype)
        if linear is not None and linear.lora is not None:
            value = np.asarray(linear.lora.merge_into(value.astype(np.float32)))
        value = value.astype(out_dtype)
        yield name, merged_rows(model, name, value.T if entry.transpose else value)  # trained token rows


def check_replaceable(out_dir) -> None:
    """Raises unless `out_dir` is absent, empty, or holds only files a checkpoint export writes."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a directory; expected a directory for the checkpoint")
    foreign = sorted(p.name for p in out_dir.iterdir()
                     if not (CHECKPOINT_FILES.match(p.name) or p.name in MODEL_SIDE_FILES))
    if foreign:
        raise ValueError(f"{out_dir} holds {foreign[:5]}{' ...' if len(foreign) > 5 else ''}, which are not part of a "
                         f"checkpoint; the export replaces the whole directory, so choose an empty or new directory")


def _write_files(tensors, hf_config: dict, out_dir: Path, source_dir, shard_bytes: int) -> None:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, value in tensors:
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
        write_json(out_dir / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_text(out_dir / "config.json", json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    if source_dir:
        for f in MODEL_SIDE_FILES:
            if (Path(source_dir) / f).exists():
                shutil.copy2(Path(source_dir) / f, out_dir / f)


def write_checkpoint(tensors: Iterable[tuple[str, np.ndarray]], hf_config: dict, out_dir, *,
                     source_dir: str | None = None, shard_bytes: int = SHARD_BYTES) -> Path:
    """model.safetensors (sharded with an index above `shard_bytes`), config.json and the tokenizer files
    of `source_dir`, swapped into `out_dir` as one directory (see the module docstring)."""
    out_dir = Path(out_dir)
    check_replaceable(out_dir)
    with atomic_directory(out_dir) as tmp:
        _write_files(tensors, hf_config, tmp, source_dir, shard_bytes)
    return out_dir


def hf_config_with_dtype(model: LlamaForCausalLM, dtype) -> dict:
    """The model's config.json dict with its dtype field set and any quantization_config removed."""
    hf = dict(model.config.hf_config)
    hf.pop("quantization_config", None)
    hf["torch_dtype" if "torch_dtype" in hf else "dtype"] = jnp.dtype(dtype).name
    return hf


def save_merged(model: LlamaForCausalLM, out_dir, *, dtype=None, shard_bytes: int = SHARD_BYTES) -> Path:
    """Writes model.safetensors (sharded with an index above `shard_bytes`), config.json, tokenizer files.

    `dtype` (default: the model's) is the dtype of every tensor written, e.g. "bfloat16" for a
    16-bit export of a float32 or NF4 model. NF4 projections are dequantized; no quantization_config
    is written, so the result loads in plain transformers. `out_dir` is replaced as a whole (module docstring).
    """
    dtype = jnp.dtype(dtype or model.dtype)
    return write_checkpoint(merged_tensors(model, dtype), hf_config_with_dtype(model, dtype), out_dir,
                            source_dir=getattr(model, "source_dir", None), shard_bytes=shard_bytes)
