"""Real configs construct under nnx.eval_shape; parameter counts equal transformers' for the same config
(built on the meta device: no memory) and the published model sizes."""
import jax
import numpy as np
import pytest
from flax import nnx

import jlora

# Parameter counts of the released checkpoints (sum of numel over their safetensors).
PUBLISHED = {
    "llama-2-7b": 6_738_415_616,
    "llama-3-8b": 8_030_261_248,
    "llama-3.1-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
    "mistral-7b": 7_248_023_552,
    "qwen2.5-7b": 7_615_616_512,
    "qwen3-8b": 8_190_735_360,     # model card: 8.2B, 6.95B non-embedding
    "qwen3-32b": 32_762_123_264,   # model card: 32.8B, 31.2B non-embedding
}


def transformers_count(hf: dict) -> int:
    """Parameters of transformers' model for the preset's config.json, built on the meta device (tied
    weights counted once, as jlora holds them)."""
    import torch
    import transformers
    config = transformers.AutoConfig.for_model(**{k: v for k, v in hf.items() if k != "architectures"})
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ in hf["architectures"], type(model).__name__
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(jlora.PRESETS))
def test_preset_constructs_abstractly(name):
    model = jlora.abstract_model(jlora.preset_config(name), dtype="bfloat16")
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert total == transformers_count(jlora.PRESETS[name])
    if name in PUBLISHED:
        assert total == PUBLISHED[name]


def test_lora_on_8b_preset_has_closed_form_count():
    model = jlora.abstract_model(jlora.preset_config("llama-3.1-8b"), dtype="bfloat16")
    model = nnx.eval_shape(lambda: jlora.get_peft_model(
        jlora.abstract_model(jlora.preset_config("llama-3.1-8b"), dtype="bfloat16"),
        jlora.LoraConfig(r=16, lora_alpha=16), rngs=nnx.Rngs(0)))
    trainable, _ = jlora.trainable_parameters(model)
    c = jlora.preset_config("llama-3.1-8b")
    closed = 16 * c.num_hidden_layers * sum(i + o for i, o in c.linear_shapes().values())
    assert trainable == closed == 41_943_040


def test_unknown_preset_lists_known():
    with pytest.raises(KeyError, match="llama-3.1-8b"):
        jlora.preset_config("llama-9")
