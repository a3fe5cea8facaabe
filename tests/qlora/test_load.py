"""Quantize-on-load and bitsandbytes 4-bit checkpoints against transformers + bitsandbytes."""
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

import jlora
from jlora import nf4
from jlora.peft_model import linear_modules


def _file_tensors(path, module: str) -> dict[str, np.ndarray]:
    """`module.weight*` tensors of a safetensors checkpoint, keyed by the suffix after `module.`."""
    tensors = load_file(str(path / "model.safetensors"))
    return {k[len(module) + 1:]: v for k, v in tensors.items() if k.startswith(module + ".weight")}


def _assert_bytes_equal(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        x, y = np.ascontiguousarray(a[k]), np.ascontiguousarray(b[k])
        assert x.dtype == y.dtype and x.size == y.size, k
        assert x.tobytes() == y.tobytes(), k


def test_quantize_on_load_equals_bitsandbytes_checkpoint(base_dir, bnb_dir):
    """Every projection quantized by jlora while loading is, byte for byte, what transformers +
    bitsandbytes quantized and saved from the same checkpoint (codes, absmax, nested stats, quant state)."""
    model = jlora.load_hf(base_dir, quantize="nf4", dtype="float32")
    for name, linear in linear_modules(model):
        assert isinstance(linear.kernel, jlora.NF4Weight), name
        _assert_bytes_equal(nf4.to_bnb_tensors(linear.kernel.get_value()), _file_tensors(bnb_dir, name))
    assert not isinstance(model.lm_head.kernel, jlora.NF4Weight)  # bitsandbytes keeps lm_head dense too


def test_quantize_on_load_in_bfloat16_equals_bitsandbytes(base_dir):
    """dtype="bfloat16": each weight is cast to bf16, then quantized, as transformers' dtype= does."""
    import torch
    import bitsandbytes.functional as F
    model = jlora.load_hf(base_dir, quantize="nf4", dtype="bfloat16")
    weights = load_file(str(base_dir / "model.safetensors"))
    for name, linear in list(linear_modules(model))[:7]:
        q = linear.kernel.get_value()
        assert q.dtype == "bfloat16" and q.double_quant and q.blocksize == 64
        w = torch.from_numpy(weights[name + ".weight"]).to(torch.bfloat16)
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        assert np.asarray(q.codes).tobytes() == packed.numpy().tobytes(), name
        assert np.asarray(q.absmax).tobytes() == state.absmax.numpy().tobytes(), name
        assert np.float32(q.offset) == np.float32(state.offset.item()), name
    assert model.model.embed_tokens.weight.get_value().dtype == ml_dtypes.bfloat16


def test_quantize_on_load_logits_equal_bitsandbytes(base_dir, ids, bnb_logits, rel):
    model = jlora.load_hf(base_dir, quantize="nf4", dtype="float32")
    assert rel(np.asarray(model(ids)), bnb_logits) <= 1e-4


def test_bitsandbytes_checkpoint_loads_bit_exactly(bnb_dir, ids, bnb_logits, rel):
    model = jlora.load_hf(bnb_dir, dtype="float32")  # detected from config.json's quantization_config
    for name, linear in linear_modules(model):
        _assert_bytes_equal(nf4.to_bnb_tensors(linear.kernel.get_value()), _file_tensors(bnb_dir, name))
    dense = load_file(str(bnb_dir / "model.safetensors"))
    np.testing.assert_array_equal(np.asarray(model.lm_head.kernel.get_value()).T, dense["lm_head.weight"])
    err = rel(np.asarray(model(ids)), bnb_logits)
    assert err <= 1e-4, err


def test_nf4_base_logits_differ_from_dense(base_dir, ids, bnb_logits, hf_model, ref, rel):
    """Guard: the 4-bit logits are not the float32 ones, so the comparisons above test quantization."""
    want = ref.logits(hf_model(base_dir), ids)
    assert rel(bnb_logits, want) > 1e-3


def test_quantize_model_matches_load(base_dir):
    """quantize_model on a dense model == quantize while loading (same weights, same bits)."""
    loaded = jlora.load_hf(base_dir, quantize="nf4")
    converted = jlora.quantize_model(jlora.load_hf(base_dir))
    for (name, a), (_, b) in zip(linear_modules(loaded), linear_modules(converted)):
        _assert_bytes_equal(nf4.to_bnb_tensors(a.kernel.get_value()), nf4.to_bnb_tensors(b.kernel.get_value()))


def test_nf4_config_options(base_dir):
    blocksize, double_quant = 128, False
    model = jlora.load_hf(base_dir, quantize=jlora.NF4Config(blocksize=blocksize, double_quant=double_quant))
    q = model.model.layers[0].mlp.up_proj.kernel.get_value()
    assert (q.blocksize, q.double_quant, q.shape) == (blocksize, double_quant, (128, 64))
