"""jlora: LoRA / QLoRA fine-tuning of Llama-family models in JAX (Flax NNX), with PEFT/vLLM adapters.

    model = jlora.load_hf("path/to/llama", dtype="bfloat16")      # quantize="nf4" for QLoRA
    model = jlora.get_peft_model(model, jlora.LoraConfig(r=16, lora_alpha=16), rngs=nnx.Rngs(0))
    jlora.save_pretrained(model, "out/adapter")
    print(jlora.generate(model, tokenizer, ["What is LoRA?"], max_new_tokens=64)[0])

The public names load on first use (PEP 562 `__getattr__`), so `import jlora.kernels` or
`import jlora.nf4` loads only what that package needs, not the model, converters and trainer;
`import jlora` alone loads nothing but jlora/host_malloc.py (which runs first: see there).
`jlora.<submodule>` (e.g. `jlora.nf4`, `jlora.convert`) also works without importing it first, as it
did when this file imported everything.
"""
import importlib

from jlora.host_malloc import keep_freed_host_memory

keep_freed_host_memory()  # before jax starts its threads: see jlora/host_malloc.py

__version__ = "0.1.0"

# Public name -> the module that defines it. One line per name, as the eager imports were.
_EXPORTS = {
    "LlamaConfig": "jlora.models.config",
    "ModelConfig": "jlora.models.config",
    "SUPPORTED_ARCHITECTURES": "jlora.models.registry",
    "PRESETS": "jlora.models.presets",
    "preset_config": "jlora.models.presets",
    "LoRA": "jlora.lora_layer",
    "LoRAParam": "jlora.lora_layer",
    "LoraConfig": "jlora.lora_config",
    "TARGET_PRESETS": "jlora.lora_config",
    "LlamaForCausalLM": "jlora.models.decoder",
    "abstract_model": "jlora.models.decoder",
    "init_random": "jlora.models.decoder",
    "use_kernels": "jlora.models.layers",
    "NF4Config": "jlora.qlora",
    "NF4Weight": "jlora.nf4_weight",
    "quantize_model": "jlora.qlora",
    "MemoryReport": "jlora.memory",
    "memory_report": "jlora.memory",
    "get_peft_model": "jlora.peft_model",
    "trainable_parameters": "jlora.peft_model",
    "print_trainable_parameters": "jlora.peft_model",
    "load_hf": "jlora.convert.hf_checkpoint",
    "save_pretrained": "jlora.convert.peft_adapter",
    "load_adapter": "jlora.convert.peft_adapter",
    "save_merged": "jlora.convert.merged",
    "save_quantized": "jlora.convert.quantized",
    "CheckpointError": "jlora.convert.safetensors_io",
}

# jlora.generate is a package whose module object is callable: jlora.generate(model, tokenizer, prompts, ...)
# (jlora/generate/__init__.py says why it is not an _EXPORTS entry).
__all__ = sorted(_EXPORTS) + ["generate", "nf4"]


def __getattr__(name: str):
    """Loads a public name from its module, or a submodule (`jlora.nf4`), on first access."""
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
    else:
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
