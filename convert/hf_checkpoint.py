"""Load a local transformers checkpoint directory into a jlora model, streaming tensor by tensor.

Peak host memory is about one copy of the model in the target dtype plus one tensor: the model is
built abstractly (`nnx.eval_shape`), then each tensor is read, cast, transposed and placed.

QLoRA (`load_quantized`, where `load_hf` goes when `quantize` is given or config.json has a
`quantization_config`): a 16/32-bit checkpoint has its 7 projections per layer quantized to NF4 as
each is read (peak about the NF4 model plus one tensor in the load dtype); a transformers +
bitsandbytes 4-bit NF4 checkpoint is read bit-exactly, each projection's tensors gathered until all
are read, then placed as one `NF4Weight`. Writing one is jlora/convert/quantized.py.

On a device mesh (`mesh=` with more than one device) every array is instead created shard by shard
from the file in the trainer's sharding (jlora/convert/sharded_load.py): no device holds more than its
shard, and each host reads only the slices its devices hold.

Scanned layers (`scan_layers=True`, jlora/models/stacked.py): the stacked arrays are built while loading
(`LayerStackBuilder`): each variable is stacked as soon as its last layer's tensor is read and the per-layer
rows are dropped, so the peak stays about one copy of the model (plus one variable's rows), never the loop
model and the stacked one side by side; on a mesh each stack is created in its rows' sharding.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jlora import nf4
from jlora.convert.hub import resolve_model
from jlora.convert.hf_names import IGNORED, bnb_weight_name, tensor_map, variable_at
from jlora.convert.safetensors_io import CheckpointError, iter_tensors, read_header
from jlora.llama import LlamaForCausalLM, abstract_model
from jlora.models.stacked import LayerStackBuilder
from jlora.llama_config import LlamaConfig
from jlora.qlora import NF4Config, NF4Weight, nf4_config

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not model_dir.is_dir():
        found = "is a file" if model_dir.exists() else "does not exist"
        raise CheckpointError(f"{model_dir}: not a directory ({found}); expected a transformers checkpoint dir "
                              "with config.json, model.safetensors and tokenizer files")
    if not path.exists():
        raise CheckpointError(f"{model_dir}: no config.json (expected a transformers checkpoint dir with "
                              f"config.json and model.safetensors)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise CheckpointError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object of model settings, found {type(config).__name__}")
    return config


def weight_files(model_dir: Path, *, allow_pickle: bool) -> list[Path]:
    """The safetensors files of a checkpoint (single file or a sharded index), or .bin with opt-in."""
    single, index = (model_dir / n for n in WEIGHT_FILES)
    if single.exists():
        return [single]
    if index.exists():
        files = index_files(index)
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


def index_files(index: Path) -> list[Path]:
    """The shard files a sharded checkpoint's index names, in order of first use.

    The index is `{"weight_map": {tensor name: shard file name}, ...}`; every shard must be a plain
    file name or a relative path inside the index's directory (an index from elsewhere must not make
    the loader read `../x.safetensors` or an absolute path)."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CheckpointError(f"{index}: not valid JSON: {e}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        found = (f"keys {sorted(data)}" if isinstance(data, dict) else type(data).__name__)
        raise CheckpointError(f'{index}: expected a JSON object with a non-empty "weight_map" '
                              f"(tensor name -> shard file), found {found}")
    files = []
    for shard in dict.fromkeys(weight_map.values()):
        if not isinstance(shard, str) or not shard:
            raise CheckpointError(f"{index}: weight_map values must be shard file names, found {shard!r}")
        # judged by the name, not by where symlinks point: the HF cache links every file to ../../blobs/
        normal = os.path.normpath(shard)
        if os.path.isabs(shard) or normal == ".." or normal.startswith(".." + os.sep):
            raise CheckpointError(f"{index}: weight_map names {shard!r}, outside the model directory "
                                  f"{index.parent}; expected shard files inside it")
        files.append(index.parent / normal)
    return files


def _iter_pickle(path: Path):
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: reading pickle weights needs torch (pip install torch)") from None
    files = [path]
    if path.name.endswith(".index.json"):
        files = index_files(path)
    for f in files:
        for name, t in torch.load(f, map_location="cpu", weights_only=True).items():
            yield name, t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


DTYPES = ("float32", "bfloat16", "float16")


def check_dtype(dtype) -> str:
    """The name of an allowed weight dtype (a string or a numpy/jax dtype), else a ValueError naming it."""
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in DTYPES:
        raise ValueError(f"load_hf: dtype={dtype!r} is not allowed; expected one of {', '.join(DTYPES)} "
                         "(the dtype the frozen weights are stored and computed in)")
    return name


SUPPORTED = ("jlora reads bitsandbytes 4-bit NF4 checkpoints (quantization_config with quant_method "
             "'bitsandbytes', load_in_4bit true, bnb_4bit_quant_type 'nf4') and quantizes 16/32-bit "
             "checkpoints itself (quantize='nf4')")


def is_bnb_nf4_checkpoint(hf: dict, where: str) -> bool:
    """True for a bitsandbytes 4-bit NF4 config.json, False without quantization_config; else an error."""
    qc = hf.get("quantization_config")
    if not qc:
        return False
    method = qc.get("quant_method")
    if method is None and ("load_in_4bit" in qc or "load_in_8bit" in qc):
        method = "bitsandbytes"  # configs written before transformers named the method
    if method != "bitsandbytes":
        raise CheckpointError(f"{where}: quantization_config.quant_method is {method!r}, not supported; {SUPPORTED}")
    if qc.get("load_in_8bit"):
        raise CheckpointError(f"{where}: a bitsandbytes 8-bit (LLM.int8, load_in_8bit) checkpoint is not "
                              f"supported; {SUPPORTED}")
    if not qc.get("load_in_4bit"):
        raise CheckpointError(f"{where}: quantization_config has neither load_in_4bit nor load_in_8bit; {SUPPORTED}")
    quant_type = qc.get("bnb_4bit_quant_type", "fp4")  # BitsAndBytesConfig's default is fp4
    if quant_type != "nf4":
        raise CheckpointError(f"{where}: bnb_4bit_quant_type is {quant_type!r}, not supported; {SUPPORTED}")
    return True


def load_quantized(model_dir, hf: dict, *, dtype="float32", quantize=None,
                   allow_pickle: bool = False, mesh=None, scan_layers: bool = False) -> LlamaForCausalLM:
    """A `LlamaForCausalLM` with NF4 projections from a checkpoint dir (see the module docstring).

    Args:
      model_dir: a transformers checkpoint dir.
      hf: its config.json as a dict.
      dtype: compute dtype, and the dtype of the dense parts (embeddings, norms, lm_head). Quantizing
        while loading casts each projection to `dtype` first, as transformers' `dtype=` with
        `load_in_4bit` does.
      quantize: "nf4" or a `jlora.NF4Config` to quantize an unquantized checkpoint; ignored for a
        checkpoint that is already NF4 (its stored block sizes are kept).
      mesh, scan_layers: as in `load_hf`.
    """
    model_dir = Path(model_dir)
    where = str(model_dir / "config.json")
    prequantized = is_bnb_nf4_checkpoint(hf, where)
    config_nf4 = nf4_config(quantize)
    config = LlamaConfig.from_hf_dict(hf, where=where)
    files = weight_files(model_dir, allow_pickle=allow_pickle)
    if prequantized and any(f.suffix != ".safetensors" for f in files):
        raise CheckpointError(f"{model_dir}: a bitsandbytes 4-bit checkpoint must be safetensors, found "
                              f"{[f.name for f in files]}")
    model = abstract_model(config, dtype=dtype)
    fill(model, config, files, None if prequantized else config_nf4, mesh=mesh, scan_layers=scan_layers)
    model.source_dir = str(model_dir.resolve())
    return model


def load_hf(model_dir, dtype="float32", *, allow_pickle: bool = False, quantize: str | None = None,
            mesh=None, scan_layers: bool = False) -> LlamaForCausalLM:
    """Reads a transformers Llama/Mistral/Qwen2 checkpoint into a `LlamaForCausalLM` in `dtype`.

    `model_dir` is a local directory or a Hugging Face Hub id (`jlora.convert.hub.resolve_model`);
    `dtype` is float32, bfloat16 or float16 (a name or a dtype). Unknown or missing tensors, wrong
    shapes, truncated or corrupt files, a shard index naming files outside the directory and pickle
    weights (without `allow_pickle=True`) are errors that name the file and tensor.

    `mesh`: a (data, fsdp, tensor) `jax.sharding.Mesh` (jlora.train.sharding.make_mesh). With more
    than one device, every array is created per shard from the file in the sharding the trainer gives
    it (jlora/convert/sharded_load.py); a mesh axis that does not divide a tensor's dimension is a
    `MeshError` naming the tensor, its shape, the axis and the mesh. None or one device: as without.

    `scan_layers=True`: the decoder layers are stacked on a leading layer axis and scanned
    (jlora/models/stacked.py), built stacked while loading (peak about one copy of the model).
    """
    dtype = check_dtype(dtype)
    model_dir = resolve_model(model_dir)
    hf = read_config(model_dir)
    if quantize is not None or hf.get("quantization_config"):
        return load_quantized(model_dir, hf, dtype=dtype, quantize=quantize, allow_pickle=allow_pickle, mesh=mesh,
                              scan_layers=scan_layers)
    config = LlamaConfig.from_hf_dict(hf, where=str(model_dir / "config.json"))
    files = weight_files(model_dir, allow_pickle=allow_pickle)
    model = abstract_model(config, dtype=dtype)
    fill(model, config, files, mesh=mesh, scan_layers=scan_layers)
    model.source_dir = str(model_dir.resolve())
    return model


def _bnb_parts(files: list[Path], expected: dict) -> dict[str, set[str]]:
    """`P.weight` -> every tensor name of it, for each projection stored in bitsandbytes' 4-bit layout."""
    names = [n for f in files if f.suffix == ".safetensors" for n in read_header(f)]
    quantized = {w for n in names if (w := bnb_weight_name(n)) and n != w and w in expected
                 and expected[w].path[-1] == "kernel"}
    parts: dict[str, set[str]] = {w: set() for w in quantized}
    for n in names:
        w = bnb_weight_name(n)
        if w in parts:
            parts[w].add(n)
    return parts


def fill(model: LlamaForCausalLM, config: LlamaConfig, files: list[Path], quantize: NF4Config | None = None,
         *, mesh=None, scan_layers: bool = False) -> None:
    """fill_from_tensors, or on a mesh of several devices (safetensors files) fill_sharded: each array
    created per shard. Pickle weights on a mesh load whole and are placed by the trainer afterwards.
    scan_layers: the layers end stacked (LayerStackBuilder), each variable stacked once all its rows are read."""
    builder = LayerStackBuilder(model) if scan_layers else None
    placed = builder.placed if builder else None
    if mesh is None or mesh.size == 1 or any(f.suffix != ".safetensors" for f in files):
        fill_from_tensors(model, config, files, quantize, placed=placed, take=builder.take if builder else None)
    else:
        from jlora.convert.sharded_load import fill_sharded
        fill_sharded(model, config, files, mesh, quantize=quantize, bnb_parts=_bnb_parts(files, tensor_map(config)),
                     placed=placed)
    if builder:
        builder.finish()


def fill_from_tensors(model: LlamaForCausalLM, config: LlamaConfig, files: list[Path],
                      quantize: NF4Config | None = None, *, placed=None, take=None) -> None:
    """Places every tensor of `files` into the abstract `model`: bitsandbytes 4-bit projections as read,
    dense projections quantized with `quantize` (if given), everything else cast to its variable's dtype.
    Unknown, missing and misshapen tensors are errors that name the file and tensor. `placed(path)` (if
    given) is called with each variable's model path once it holds its value; `take(path, host array,
    dtype)` (if given) may take a dense tensor instead of its variable (LayerStackBuilder: rows of a stack)."""
    placed = placed or (lambda path: None)
    take = take or (lambda path, array, dtype: False)
    expected = tensor_map(config)
    parts = _bnb_parts(files, expected)
    pending: dict[str, dict[str, np.ndarray]] = {}
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
            weight = bnb_weight_name(name)
            if weight in parts:
                group = pending.setdefault(weight, {})
                group[name[len(weight) - len("weight"):]] = array  # keyed "weight", "weight.absmax", ...
                if len(group) == len(parts[weight]):
                    _place_bnb(model, expected[weight], weight, pending.pop(weight), path)
                    placed(expected[weight].path)
                    seen.add(weight)
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
            if quantize is not None and entry.path[0] == "model" and entry.path[-1] == "kernel":
                w = jnp.asarray(np.asarray(array).astype(jnp.dtype(var.dtype)))  # [out, in], as stored
                q = nf4.quantize(w, blocksize=quantize.blocksize, double_quant=quantize.double_quant)
                jax.block_until_ready(q)  # one dense tensor in flight at a time, not a queue of them
                variable_at(model, entry.path[:-1]).kernel = NF4Weight(q)
            else:
                value = array.T if entry.transpose else array
                if not take(entry.path, value, var.dtype):
                    var.set_value(jnp.asarray(np.asarray(value).astype(jnp.dtype(var.dtype))))
            placed(entry.path)
            seen.add(name)
    if unknown:
        raise CheckpointError(f"{files[0].parent}: tensors that are not part of a {config.model_type} model: "
                              f"{sorted(unknown)[:20]}{' ...' if len(unknown) > 20 else ''}")
    missing = sorted(set(expected) - seen)
    if missing:
        raise CheckpointError(f"{files[0].parent}: checkpoint lacks tensors the config requires: "
                              f"{missing[:20]}{' ...' if len(missing) > 20 else ''}")


def _place_bnb(model: LlamaForCausalLM, entry, weight: str, tensors: dict[str, np.ndarray], path: Path) -> None:
    try:
        q = nf4.from_bnb_tensors(tensors)
    except ValueError as e:
        raise CheckpointError(f"{path}: {weight}: {e}") from None
    want = entry.hf_shape(variable_at(model, entry.path).shape)
    if q.shape != want:
        raise CheckpointError(f"{path}: {weight} holds a 4-bit weight of shape {q.shape}, config.json implies {want}")
    variable_at(model, entry.path[:-1]).kernel = NF4Weight(q)
