"""Bad input gets an error that names what was expected, what was found, and where."""
import json
import shutil

import numpy as np
import pytest
from flax import nnx

import jlora
from jlora.convert.safetensors_io import write_atomic


def test_dir_without_config(tmp_path):
    with pytest.raises(jlora.CheckpointError, match="no config.json"):
        jlora.load_hf(tmp_path)


def test_not_a_dir(tmp_path):
    with pytest.raises(jlora.CheckpointError, match="not a directory"):
        jlora.load_hf(tmp_path / "nope")


def test_dir_without_weights(checkpoint, tmp_path):
    shutil.copy(checkpoint("llama") / "config.json", tmp_path / "config.json")
    with pytest.raises(jlora.CheckpointError, match="no weights found"):
        jlora.load_hf(tmp_path)


def test_pickle_refused_without_opt_in(checkpoint, tmp_path):
    shutil.copy(checkpoint("llama") / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(jlora.CheckpointError, match="allow_pickle=True"):
        jlora.load_hf(tmp_path)


def test_pickle_loads_with_opt_in(checkpoint, tmp_path, rel):
    import torch
    from safetensors.torch import load_file
    src = checkpoint("llama")
    shutil.copy(src / "config.json", tmp_path / "config.json")
    torch.save(load_file(src / "model.safetensors"), tmp_path / "pytorch_model.bin")
    ids = np.arange(10)[None]
    assert rel(jlora.load_hf(tmp_path, allow_pickle=True)(ids), jlora.load_hf(src)(ids)) == 0


def test_unsupported_architecture_lists_supported(checkpoint, tmp_path):
    shutil.copytree(checkpoint("llama"), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM.*MistralForCausalLM.*Qwen2ForCausalLM"):
        jlora.load_hf(tmp_path / "m")


def test_truncated_safetensors(checkpoint, tmp_path):
    shutil.copytree(checkpoint("llama"), tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(jlora.CheckpointError, match="truncated safetensors file"):
        jlora.load_hf(tmp_path / "m")


def test_unknown_and_missing_tensors_are_named(checkpoint, tmp_path):
    from jlora.convert.safetensors_io import iter_tensors
    shutil.copytree(checkpoint("llama"), tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    tensors = dict(iter_tensors(f))
    tensors["model.layers.0.mlp.extra.weight"] = np.zeros(3, np.float32)
    write_atomic(f, tensors)
    with pytest.raises(jlora.CheckpointError, match="model.layers.0.mlp.extra.weight"):
        jlora.load_hf(tmp_path / "m")
    del tensors["model.layers.0.mlp.extra.weight"], tensors["model.layers.1.self_attn.k_proj.weight"]
    write_atomic(f, tensors)
    with pytest.raises(jlora.CheckpointError, match="lacks.*model.layers.1.self_attn.k_proj.weight"):
        jlora.load_hf(tmp_path / "m")


def test_target_module_the_model_lacks(checkpoint):
    model = jlora.load_hf(checkpoint("llama"))
    with pytest.raises(ValueError, match=r"\['c_attn'\].*'q_proj'"):
        jlora.get_peft_model(model, jlora.LoraConfig(target_modules=["q_proj", "c_attn"]), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="matches no module"):
        jlora.get_peft_model(model, jlora.LoraConfig(target_modules=r".*\.fc\d"), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("r", [0, -4, 2.5])
def test_bad_rank(r):
    with pytest.raises(ValueError, match="positive integer"):
        jlora.LoraConfig(r=r)
    with pytest.raises(ValueError, match="positive integer"):
        jlora.LoraConfig(rank_pattern={"q_proj": r})


def test_adapter_for_another_base(checkpoint, tmp_path):
    model = jlora.get_peft_model(jlora.load_hf(checkpoint("mistral")), jlora.LoraConfig(r=4), rngs=nnx.Rngs(0))
    jlora.save_pretrained(model, tmp_path / "a")
    with pytest.raises(jlora.CheckpointError, match=r"q_proj.lora_B.weight has shape \(64, 4\), the model needs \(32, 4\)"):
        jlora.load_adapter(jlora.load_hf(checkpoint("llama-tied")), tmp_path / "a")


def test_adapter_dir_without_config(tmp_path):
    with pytest.raises(jlora.CheckpointError, match="no adapter_config.json"):
        jlora.load_adapter(None, tmp_path)


def test_dora_adapter_refused(checkpoint, tmp_path):
    model = jlora.get_peft_model(jlora.load_hf(checkpoint("llama")), jlora.LoraConfig(r=4), rngs=nnx.Rngs(0))
    jlora.save_pretrained(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(jlora.CheckpointError, match="use_dora"):
        jlora.load_adapter(jlora.load_hf(checkpoint("llama")), tmp_path / "a")


def test_save_without_adapters(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="get_peft_model"):
        jlora.save_pretrained(jlora.load_hf(checkpoint("llama")), tmp_path / "a")


@pytest.mark.parametrize("dtype", ["int8", "uint8", "float64", "nf4", None])
def test_load_hf_refuses_dtypes_other_than_floats(checkpoint, dtype):
    # int8 used to cast every weight to 0
    with pytest.raises(ValueError, match=rf"load_hf: dtype={dtype!r} is not allowed; expected one of "
                                         "float32, bfloat16, float16"):
        jlora.load_hf(checkpoint("llama"), dtype=dtype)


@pytest.mark.parametrize("dtype", ["float16", np.float32])
def test_load_hf_accepts_float_dtypes_by_name_or_type(checkpoint, dtype):
    model = jlora.load_hf(checkpoint("llama"), dtype=dtype)
    kernel = model.model.layers[0].self_attn.q_proj.kernel
    assert kernel.dtype == np.dtype(dtype) and np.abs(np.asarray(kernel, np.float32)).max() > 0


def test_shard_index_outside_the_model_dir_is_refused(checkpoint, tmp_path):
    shutil.copytree(checkpoint("llama"), tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").rename(tmp_path / "x.safetensors")
    (tmp_path / "m" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.embed_tokens.weight": "../x.safetensors"}}))
    with pytest.raises(jlora.CheckpointError, match=r"names '\.\./x\.safetensors', outside the model directory"):
        jlora.load_hf(tmp_path / "m")
