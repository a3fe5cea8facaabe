"""The model a plan is about: a config by preset name or checkpoint dir, built abstractly (no weights).

    model = abstract_lora_model(config, lora=LoraConfig(r=16), dtype="bfloat16", quantize="nf4")

Every array of the result is a ShapeDtypeStruct (`nnx.eval_shape`): a 70B model costs no memory.
"""
from __future__ import annotations

import json
from pathlib import Path

from flax import nnx

from jlora.llama import LlamaForCausalLM
from jlora.llama_config import LlamaConfig
from jlora.lora_config import TARGET_PRESETS, LoraConfig
from jlora.peft_model import get_peft_model
from jlora.presets import PRESETS, preset_config
from jlora.qlora import quantize_model


class PlanError(ValueError):
    """A plan request that cannot be carried out (unknown model, unavailable option, bad mesh)."""


def model_config(model: str) -> LlamaConfig:
    """A preset name (`llama-3.1-8b`) or a checkpoint directory holding config.json."""
    if model in PRESETS:
        return preset_config(model)
    path = Path(model)
    if (path / "config.json").is_file():
        return LlamaConfig.from_hf_dict(json.loads((path / "config.json").read_text()),
                                        where=str(path / "config.json"))
    raise PlanError(f"--model {model!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a directory "
                    f"with a config.json")


def checkpoint_quantization(model: str) -> str | None:
    """'nf4' when the checkpoint dir is a bitsandbytes 4-bit NF4 export, else None."""
    path = Path(model) / "config.json"
    if model in PRESETS or not path.is_file():
        return None
    q = json.loads(path.read_text()).get("quantization_config") or {}
    return "nf4" if q.get("load_in_4bit") and q.get("bnb_4bit_quant_type", "nf4") == "nf4" else None


def quantizer(kind: str | None):
    """The in-place quantizer for `--quantize kind`: jlora.quantize_model for nf4 (must trace abstractly)."""
    if kind is None:
        return None
    if kind != "nf4":
        raise PlanError(f"--quantize {kind!r} is not supported; supported: nf4")
    return quantize_model


def lora_config(r: int, lora_alpha: float | None = None, targets: str = "all-linear") -> LoraConfig:
    target = targets if targets in TARGET_PRESETS else [t.strip() for t in targets.split(",") if t.strip()]
    return LoraConfig(r=r, lora_alpha=r if lora_alpha is None else lora_alpha, target_modules=target)


def abstract_lora_model(config: LlamaConfig, *, lora: LoraConfig, dtype: str = "bfloat16",
                        quantize: str | None = None, remat: bool = False) -> LlamaForCausalLM:
    """The LoRA (or QLoRA) model as `jlora train` builds it, with ShapeDtypeStruct leaves, in train mode."""
    quant = quantizer(quantize)

    def build():
        model = LlamaForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(0))
        if quant is not None:
            model = quant(model)  # converts the projection kernels in place
        return get_peft_model(model, lora, rngs=nnx.Rngs(params=0, dropout=1))

    model = nnx.eval_shape(build)
    model.remat = remat
    model.train()
    return model
