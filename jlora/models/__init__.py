"""Decoder-only model families: one decoder written once, each family stated as data.

    config.py     ModelConfig: every family difference as a field with the Llama value as default
    family.py     Family (one model_type: config reader, presets, LoRA target names), LayerSpec, ConfigError
    hf_fields.py  reading transformers config.json fields (shared by the family readers)
    registry.py   model_type -> Family: read by load_hf, the converters, the presets and the planner
    layers.py     Linear (frozen + LoRA), RMSNorm, Embedding, MLP;  attention.py  Attention;  rope.py
    decoder.py    DecoderLayer, DecoderModel, CausalLM (= LlamaForCausalLM), init_random, abstract_model
    llama.py, qwen3.py, ...   one file per family: its config reader and presets, nothing else

Adding a family: a new file with a `FAMILIES` tuple, one line in registry._MODULES; when it needs a new
behaviour, a new ModelConfig field (default: Llama's) read where the behaviour lives, never a branch on
model_type.

Layers and scanning (pod-scale issue): every decoder layer of a model has the same parameter structure
(the same modules, shapes and dtypes); what may differ between layers is only static data, the layer's
`LayerSpec` (its attention window and which rope table rotates its q and k). So a scanned stack stacks
the parameters of all layers on a leading axis, and groups layers by their position in the repeating
pattern of specs (`ModelConfig.layer_pattern`: 1 for Llama/Qwen, 2 for Gemma2's alternating windows, 6 for
Gemma3's five local + one global); the specs are never traced values and never Python branches inside
the scanned body beyond one per pattern position. The rope tables are computed once per model call and
handed to every layer with the layer's own table selected by its spec.
"""
from jlora.models.config import ModelConfig as ModelConfig
from jlora.models.config import LlamaConfig as LlamaConfig
from jlora.models.family import ConfigError as ConfigError
from jlora.models.family import Family as Family
from jlora.models.family import LayerSpec as LayerSpec
from jlora.models.registry import FAMILIES as FAMILIES
from jlora.models.registry import SUPPORTED_ARCHITECTURES as SUPPORTED_ARCHITECTURES
from jlora.models.registry import family_for as family_for
