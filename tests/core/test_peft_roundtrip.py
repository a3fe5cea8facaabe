"""jlora adapters and PEFT adapters move both ways with identical logits (PEFT is the reference)."""

import numpy as np
import peft
import pytest
from flax import nnx

import jlora
from tests.peft_checks import (jlora_adapter_loads_in_peft, merged_export_loads_in_transformers,
                               peft_adapter_loads_in_jlora)

CASES = [
    # (family, LoraConfig kwargs)
    ("llama", dict(r=1, lora_alpha=2)),
    ("llama", dict(r=8, lora_alpha=16, use_rslora=True)),
    ("llama", dict(r=64, lora_alpha=16)),
    ("llama", dict(r=64, lora_alpha=128, use_rslora=True)),
    ("llama", dict(r=8, lora_alpha=8, rank_pattern={"down_proj": 4, "layers.1.self_attn.q_proj": 2},
                   alpha_pattern={"v_proj": 32})),
    ("llama", dict(r=8, lora_alpha=16, target_modules="qv")),
    ("llama", dict(r=4, lora_alpha=8, target_modules=r"model\.layers\.1\.mlp\.(up|down)_proj")),
    ("llama-tied", dict(r=8, lora_alpha=16, target_modules="attention")),
    ("mistral", dict(r=8, lora_alpha=16)),
    ("qwen2", dict(r=8, lora_alpha=16, use_rslora=True, rank_pattern={"k_proj": 2})),
]


def _ids(seed=3):
    return np.random.RandomState(seed).randint(0, 96, (2, 20))


@pytest.mark.parametrize("family,kwargs", CASES)
def test_jlora_export_loads_in_peft(family, kwargs, checkpoint, tmp_path):
    _, saved = jlora_adapter_loads_in_peft(checkpoint(family), kwargs, _ids(), tmp_path / "adapter", max_lora_rank=64,
                                           what=f"{family} {kwargs}")
    assert isinstance(saved["target_modules"], list) and saved["base_model_name_or_path"]


@pytest.mark.parametrize("family,kwargs", [CASES[1], CASES[4], CASES[9]])
def test_peft_saved_adapter_loads_in_jlora(family, kwargs, checkpoint, tmp_path):
    targets = jlora.LoraConfig(**kwargs).target_modules
    pcfg = peft.LoraConfig(r=kwargs["r"], lora_alpha=kwargs["lora_alpha"], target_modules=targets,
                           use_rslora=kwargs.get("use_rslora", False), rank_pattern=kwargs.get("rank_pattern", {}),
                           alpha_pattern=kwargs.get("alpha_pattern", {}), init_lora_weights=False,
                           task_type="CAUSAL_LM")
    peft_adapter_loads_in_jlora(checkpoint(family), pcfg, _ids(), tmp_path / "peft", what=f"{family} {kwargs}")


def test_trainable_parameters_equal_peft(checkpoint, hf_model):
    path = checkpoint("qwen2")
    kwargs = dict(r=8, lora_alpha=16, rank_pattern={"down_proj": 2})
    ref = peft.get_peft_model(hf_model(path), peft.LoraConfig(target_modules=list(jlora.LoraConfig().target_modules),
                                                              task_type="CAUSAL_LM", **kwargs))
    model = jlora.get_peft_model(jlora.load_hf(path), jlora.LoraConfig(**kwargs), rngs=nnx.Rngs(0))
    assert jlora.trainable_parameters(model) == tuple(ref.get_nb_trainable_parameters())


def test_merged_export_loads_in_transformers(checkpoint, tmp_path):
    merged_export_loads_in_transformers(checkpoint("qwen2"), dict(r=8), _ids(), tmp_path / "merged")


def test_merged_sharded_export_reloads(checkpoint, hf_model, close32, tmp_path, logits32_and_64):
    path = checkpoint("llama")
    model = jlora.get_peft_model(jlora.load_hf(path), jlora.LoraConfig(r=4, init_lora_weights=False),
                                 rngs=nnx.Rngs(1))
    jlora.save_merged(model, tmp_path / "merged", shard_bytes=20_000)
    assert (tmp_path / "merged" / "model.safetensors.index.json").exists()
    want, want64 = logits32_and_64(hf_model(tmp_path / "merged"), _ids())
    close32(np.asarray(jlora.load_hf(tmp_path / "merged")(_ids())), want, want64, what="sharded merged")


def test_adapter_files_are_written_with_plain_file_modes(checkpoint, tmp_path):
    """save_pretrained writes through jlora.atomic_files: 0o666 less the umask, as a plain write would, so a
    server running as another user can read the adapter (a mkstemp-based writer left adapter_config.json 0o600)."""
    import os
    mask = os.umask(0o022)
    try:
        model = jlora.get_peft_model(jlora.load_hf(checkpoint("llama")), jlora.LoraConfig(r=2), rngs=nnx.Rngs(0))
        jlora.save_pretrained(model, tmp_path / "adapter")
    finally:
        os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "adapter").iterdir()}
    assert modes == {"adapter_config.json": 0o644, "adapter_model.safetensors": 0o644}
