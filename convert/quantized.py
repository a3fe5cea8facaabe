"""QLoRA checkpoints: quantize to NF4 while loading, read bitsandbytes 4-bit checkpoints, write them.

    load_quantized(dir, hf, quantize="nf4")   # a 16/32-bit checkpoint; the 7 projections per layer -> NF4
    load_quantized(dir, hf)                   # a transformers + bitsandbytes 4-bit NF4 checkpoint, bit-exact
    save_quantized(model, out_dir)            # the NF4 base in that layout, loadable by transformers + bnb

`jlora.load_hf` dispatches here when `quantize` is given or config.json has a `quantization_config`.
Streaming: the model is built abstractly, then each tensor is read, quantized if it is a projection,
placed and dropped, so peak host memory is about the NF4 model plus one tensor in the load dtype.
A 4-bit projection's tensors (`P.weight`, `P.weight.absmax`, ... see jlora/nf4/bnb_layout.py) are
gathered until all of them are read, then placed as one `NF4Weight`.
"""
from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jlora import nf4
from jlora.convert.hf_checkpoint import fill_from_tensors, weight_files
from jlora.convert.hf_names import tensor_map, variable_at
from jlora.convert.merged import SHARD_BYTES, hf_config_with_dtype, write_checkpoint
from jlora.convert.safetensors_io import CheckpointError
from jlora.llama import LlamaForCausalLM, abstract_model
from jlora.llama_config import LlamaConfig
from jlora.peft_model import linear_modules
from jlora.qlora import NF4Weight, is_quantized, nf4_config

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
                   allow_pickle: bool = False) -> LlamaForCausalLM:
    """A `LlamaForCausalLM` with NF4 projections from a checkpoint dir (see the module docstring).

    Args:
      model_dir: a transformers checkpoint dir.
      hf: its config.json as a dict.
      dtype: compute dtype, and the dtype of the dense parts (embeddings, norms, lm_head). Quantizing
        while loading casts each projection to `dtype` first, as transformers' `dtype=` with
        `load_in_4bit` does.
      quantize: "nf4" or a `jlora.NF4Config` to quantize an unquantized checkpoint; ignored for a
        checkpoint that is already NF4 (its stored block sizes are kept).
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
    fill_from_tensors(model, config, files, None if prequantized else config_nf4)
    model.source_dir = str(model_dir.resolve())
    return model


# -- export -----------------------------------------------------------------------------------------

def bnb_quantization_config(model: LlamaForCausalLM) -> dict:
    """The `quantization_config` transformers writes for a `BitsAndBytesConfig(load_in_4bit=True, nf4)` model."""
    linears = list(linear_modules(model))
    if model.lm_head is not None:
        linears.append(("lm_head", model.lm_head))
    quantized = [m.kernel.get_value() for _, m in linears if is_quantized(m)]
    if not quantized:
        raise ValueError("the model has no NF4 weights to save in bitsandbytes' layout: quantize it first "
                         "(jlora.quantize_model, or jlora.load_hf(..., quantize='nf4'))")
    dense = [n for n, m in linears if not is_quantized(m)]
    skip = None if dense in ([], ["lm_head"]) else dense  # None: transformers keeps lm_head dense itself
    return {
        "_load_in_4bit": True, "_load_in_8bit": False, "load_in_4bit": True, "load_in_8bit": False,
        "quant_method": "bitsandbytes", "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": quantized[0].double_quant,
        "bnb_4bit_compute_dtype": jnp.dtype(model.dtype).name, "bnb_4bit_quant_storage": "uint8",
        "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": skip, "llm_int8_threshold": 6.0,
    }


def quantized_tensors(model: LlamaForCausalLM):
    """(HF name, numpy array): NF4 projections in bitsandbytes' layout, the rest in its own dtype."""
    for name, entry in tensor_map(model.config).items():
        var = variable_at(model, entry.path)
        if isinstance(var, NF4Weight):
            prefix = name[:-len("weight")]
            for suffix, array in nf4.to_bnb_tensors(var.get_value()).items():
                yield prefix + suffix, array
        else:
            value = np.asarray(var[...])
            yield name, value.T if entry.transpose else value


def save_quantized(model: LlamaForCausalLM, out_dir, *, shard_bytes: int = SHARD_BYTES) -> Path:
    """Writes the NF4 base as transformers + bitsandbytes save a 4-bit model, with config.json and tokenizer.

    `AutoModelForCausalLM.from_pretrained(out_dir)` then loads it as a bitsandbytes 4-bit model
    (bit-exact NF4 weights) and `jlora.load_hf(out_dir)` loads it back. LoRA adapters are not part
    of the base: save them with `jlora.save_pretrained`. `out_dir` is replaced as a whole, atomically
    (see jlora.convert.merged: a previous export in it is swapped out, any other file is an error).
    """
    hf = hf_config_with_dtype(model, model.dtype)
    hf["quantization_config"] = bnb_quantization_config(model)
    return write_checkpoint(quantized_tensors(model), hf, out_dir, source_dir=getattr(model, "source_dir", None),
                            shard_bytes=shard_bytes)
