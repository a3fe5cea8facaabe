"""jlora: LoRA / QLoRA fine-tuning of Llama-family models in JAX (Flax NNX), with PEFT/vLLM adapters.

    model = jlora.load_hf("path/to/llama", dtype="bfloat16")      # quantize="nf4" for QLoRA
    model = jlora.get_peft_model(model, jlora.LoraConfig(r=16, lora_alpha=16), rngs=nnx.Rngs(0))
    jlora.save_pretrained(model, "out/adapter")
"""
from jlora.llama_config import LlamaConfig
from jlora.llama_config import SUPPORTED_ARCHITECTURES
from jlora.presets import PRESETS
from jlora.presets import preset_config
from jlora.lora_layer import LoRA
from jlora.lora_layer import LoRAParam
from jlora.lora_config import LoraConfig
from jlora.lora_config import TARGET_PRESETS
from jlora.llama import LlamaForCausalLM
from jlora.llama import abstract_model
from jlora.llama import init_random
from jlora.llama import use_kernels
from jlora import nf4
from jlora.qlora import NF4Config
from jlora.qlora import NF4Weight
from jlora.qlora import quantize_model
from jlora.memory import MemoryReport
from jlora.memory import memory_report
from jlora.peft_model import get_peft_model
from jlora.peft_model import trainable_parameters
from jlora.peft_model import print_trainable_parameters
from jlora.convert.hf_checkpoint import load_hf
from jlora.convert.peft_adapter import save_pretrained
from jlora.convert.peft_adapter import load_adapter
from jlora.convert.merged import save_merged
from jlora.convert.quantized import save_quantized
from jlora.convert.safetensors_io import CheckpointError

__version__ = "0.1.0"
