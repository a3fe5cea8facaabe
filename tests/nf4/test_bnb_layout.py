"""to_bnb_tensors / from_bnb_tensors against bitsandbytes' QuantState and a transformers checkpoint."""
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jlora import nf4


def _weight(shape, dtype="bfloat16", seed=0):
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.05
    return w.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)


def _bnb_tensors(bnb, w, blocksize=64, double_quant=True, quant_type="nf4"):
    """What bitsandbytes' Linear4bit._save_to_state_dict writes under `P.`."""
    packed, state = bnb.F.quantize_4bit(bnb.to_torch(w), blocksize=blocksize, quant_type=quant_type,
                                        compress_statistics=double_quant)
    out = {"weight": packed}
    out.update({"weight." + k: v for k, v in state.as_dict(packed=True).items()})
    return {k: bnb.to_numpy(v) for k, v in out.items()}


def _assert_same_tensors(got, expected, bits):
    assert sorted(got) == sorted(expected)
    for key in expected:
        assert got[key].dtype == expected[key].dtype and got[key].shape == expected[key].shape, key
        np.testing.assert_array_equal(bits(got[key]), bits(expected[key]), err_msg=key)


def _assert_same_nf4(a, b, bits):
    assert (a.shape, a.blocksize, a.nested_blocksize, a.double_quant, a.dtype) == (
        b.shape, b.blocksize, b.nested_blocksize, b.double_quant, b.dtype)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(bits(x), bits(y))


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype,shape", [("bfloat16", (48, 160)), ("float32", (5, 33))])
def test_matches_quant_state_as_dict(bnb, bits, double_quant, dtype, shape):
    w = _weight(shape, dtype)
    expected = _bnb_tensors(bnb, w, 64, double_quant)
    q = nf4.quantize(w, blocksize=64, double_quant=double_quant)
    _assert_same_tensors(nf4.to_bnb_tensors(q), expected, bits)
    back = nf4.from_bnb_tensors(expected)
    _assert_same_nf4(back, q, bits)
    _assert_same_tensors(nf4.to_bnb_tensors(back), expected, bits)


@pytest.fixture(scope="module")
def transformers_checkpoint(tmp_path_factory):
    """A tiny bf16 Llama and the same model saved by transformers after 4-bit NF4 double quant."""
    import torch
    import transformers
    from safetensors.torch import load_file

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=160,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    dense_dir, nf4_dir = tmp_path_factory.mktemp("dense"), tmp_path_factory.mktemp("nf4")
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(dense_dir)
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True,
                                            bnb_4bit_compute_dtype=torch.bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        dense_dir, quantization_config=quant, device_map="cpu", dtype=torch.bfloat16)
    model.save_pretrained(nf4_dir)
    return load_file(dense_dir / "model.safetensors"), load_file(nf4_dir / "model.safetensors")


def test_transformers_checkpoint_round_trip(bnb, bits, transformers_checkpoint):
    """Every quantized linear: read, write back byte for byte, and quantize to the same bytes."""
    dense, saved = transformers_checkpoint
    state_key = "weight.quant_state.bitsandbytes__nf4"
    prefixes = sorted(k[: -len(state_key) - 1] for k in saved if k.endswith("." + state_key))
    assert len(prefixes) == 7  # q, k, v, o, gate, up, down
    for prefix in prefixes:
        layer = {k[len(prefix) + 1:]: v for k, v in saved.items() if k.startswith(prefix + ".weight")}
        tensors = {k: bnb.to_numpy(v) for k, v in layer.items()}
        assert json.loads(bytes(tensors[state_key]))["dtype"] == "bfloat16"
        q = nf4.from_bnb_tensors(tensors)
        _assert_same_tensors(nf4.to_bnb_tensors(q), tensors, bits)
        ours = nf4.quantize(bnb.to_numpy(dense[prefix + ".weight"]), blocksize=64, double_quant=True)
        _assert_same_nf4(ours, q, bits)
        state = bnb.F.QuantState.from_dict(
            {k.removeprefix("weight."): v for k, v in layer.items() if k != "weight"}, device="cpu")
        expected = bnb.dequantize(layer["weight"], state, bnb.torch.bfloat16)
        np.testing.assert_array_equal(bits(nf4.dequantize(q, jnp.bfloat16)), bits(expected))


@pytest.fixture
def good(bnb):
    return _bnb_tensors(bnb, _weight((8, 64)), 64, True)


def _with_state(tensors, **changes):
    key = "weight.quant_state.bitsandbytes__nf4"
    state = json.loads(bytes(tensors[key]))
    state.update(changes)
    return {**tensors, key: np.frombuffer(json.dumps(state).encode(), np.uint8)}


def test_fp4_is_refused(bnb):
    fp4 = _bnb_tensors(bnb, _weight((8, 64)), 64, True, quant_type="fp4")
    with pytest.raises(ValueError, match=r"quant_type 'fp4' is not supported.*'nf4'"):
        nf4.from_bnb_tensors(fp4)


@pytest.mark.parametrize("change,match", [
    (dict(blocksize=16), r"blocksize 16 is not one bitsandbytes allows \(32, 64"),
    (dict(blocksize=8192), "blocksize 8192"),
    (dict(quant_type="int4"), "quant_type 'int4'"),
    (dict(dtype="float64"), "dtype 'float64'"),
    (dict(shape=[512]), "not a 2-D weight shape"),
    (dict(nested_dtype="float16"), "nested_dtype"),
])
def test_bad_quant_state(good, change, match):
    with pytest.raises(ValueError, match=match):
        nf4.from_bnb_tensors(_with_state(good, **change))


def test_bad_tensors(good):
    missing = {k: v for k, v in good.items() if k != "weight.nested_absmax"}
    with pytest.raises(ValueError, match=r"missing \['weight.nested_absmax'\]"):
        nf4.from_bnb_tensors(missing)
    with pytest.raises(ValueError, match=r"unexpected \['bias'\]"):
        nf4.from_bnb_tensors({**good, "bias": np.zeros(8, np.float32)})
    with pytest.raises(ValueError, match="weight.quant_map: not the NF4 code book"):
        nf4.from_bnb_tensors({**good, "weight.quant_map": good["weight.quant_map"][::-1].copy()})
    with pytest.raises(ValueError, match="weight.absmax: expected uint8 with 8 elements, found float32"):
        nf4.from_bnb_tensors({**good, "weight.absmax": np.ones(8, np.float32)})
    with pytest.raises(ValueError, match="weight: expected 256 bytes"):
        nf4.from_bnb_tensors({**good, "weight": good["weight"][:100]})
    with pytest.raises(ValueError, match="exactly one 'weight.quant_state.bitsandbytes__nf4'"):
        nf4.from_bnb_tensors({k: v for k, v in good.items() if "quant_state" not in k})


def test_non_uint8_quant_storage_is_read_as_bytes(good, bits):
    """bnb_4bit_quant_storage=bfloat16 saves the same packed bytes viewed as another dtype."""
    viewed = {**good, "weight": good["weight"].reshape(-1).view(ml_dtypes.bfloat16).reshape(-1, 1)}
    _assert_same_nf4(nf4.from_bnb_tensors(viewed), nf4.from_bnb_tensors(good), bits)
