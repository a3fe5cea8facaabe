"""Options bitsandbytes does not allow and 4-bit checkpoints jlora does not read: errors that say what
was found and what is supported."""
import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jlora
from jlora.convert.safetensors_io import CheckpointError


@pytest.mark.parametrize("blocksize", [48, 16, 8192])
def test_blocksize_bitsandbytes_does_not_allow(blocksize, base_dir):
    allowed = r"\(32, 64, 128, 256, 512, 1024, 2048, 4096\)"
    with pytest.raises(ValueError, match=rf"blocksize={blocksize} is not supported.*{allowed}"):
        jlora.quantize_model(jlora.abstract_model(jlora.preset_config("llama-3.2-1b")), blocksize=blocksize)
    with pytest.raises(ValueError, match=rf"blocksize={blocksize} is not supported.*{allowed}"):
        jlora.load_hf(base_dir, quantize=jlora.NF4Config(blocksize=blocksize))


def test_unknown_quantize_method(base_dir):
    with pytest.raises(ValueError, match=r"quantize='int8' is not supported.*\['nf4'\]"):
        jlora.load_hf(base_dir, quantize="int8")


def _copy_with_config(src, dst, **quantization_config):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"].update(quantization_config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("change,found", [
    (dict(bnb_4bit_quant_type="fp4"), "bnb_4bit_quant_type is 'fp4'"),
    (dict(quant_method="gptq"), "quant_method is 'gptq'"),
    (dict(quant_method="awq"), "quant_method is 'awq'"),
    (dict(load_in_4bit=False, load_in_8bit=True), "8-bit"),
])
def test_quantized_checkpoints_jlora_does_not_read(change, found, bnb_dir, tmp_path):
    path = _copy_with_config(bnb_dir, tmp_path / "ckpt", **change)
    with pytest.raises(CheckpointError) as e:
        jlora.load_hf(path)
    msg = str(e.value)
    assert found in msg and "config.json" in msg
    assert "bitsandbytes 4-bit NF4" in msg and "'nf4'" in msg  # what is supported


def test_fp4_tensor_in_an_nf4_checkpoint(bnb_dir, tmp_path):
    """A tensor whose quant state says fp4 is refused by name, even when config.json says nf4."""
    path = tmp_path / "ckpt"
    shutil.copytree(bnb_dir, path)
    tensors = load_file(str(path / "model.safetensors"))
    key = "model.layers.1.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"
    state = json.loads(bytes(tensors.pop(key)).decode())
    state["quant_type"] = "fp4"
    tensors[key.replace("__nf4", "__fp4")] = np.frombuffer(json.dumps(state).encode(), np.uint8).copy()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight: .*'fp4' is not supported.*'nf4'"):
        jlora.load_hf(path)


def test_missing_4bit_statistics(bnb_dir, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(bnb_dir, path)
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.0.self_attn.k_proj.weight.nested_absmax"]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"k_proj\.weight: .*missing \['weight\.nested_absmax'\]"):
        jlora.load_hf(path)


def test_save_quantized_needs_nf4_weights(base_dir, tmp_path):
    with pytest.raises(ValueError, match="no NF4 weights.*quantize_model"):
        jlora.save_quantized(jlora.load_hf(base_dir), tmp_path)
