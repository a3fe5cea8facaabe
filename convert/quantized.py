"""QLoRA checkpoints out: the NF4 base in bitsandbytes' 4-bit layout, loadable by transformers + bnb.

    save_quantized(model, out_dir)

Reading them (and quantizing while loading) is `jlora.load_hf` (jlora/convert/hf_checkpoint.py:
`load_quantized`). A 4-bit projection's tensors are `P.weight`, `P.weight.absmax`, ... (see
jlora/nf4/bnb_layout.py).
"""
from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jlora import nf4
from jlora.convert.hf_names import tensor_map, variable_at
from jlora.convert.merged import SHARD_BYTES, hf_config_with_dtype, write_checkpoint
from jlora.llama import LlamaForCausalLM
from jlora.peft_model import linear_modules
from jlora.qlora import NF4Weight, is_quantized

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
