"""QLoRA out of jlora: the NF4 base in bitsandbytes' layout, PEFT adapters, merged 16-bit checkpoints."""
import json

import numpy as np
import peft
import pytest
from flax import nnx
from safetensors.numpy import load_file

import jlora


@pytest.fixture(scope="module")
def qlora_model(base_dir):
    """NF4 base quantized while loading + a LoRA adapter with random, non-zero B."""
    model = jlora.load_hf(base_dir, quantize="nf4", dtype="float32")
    cfg = jlora.LoraConfig(r=8, lora_alpha=16, init_lora_weights=False)
    return jlora.get_peft_model(model, cfg, rngs=nnx.Rngs(3))


def test_save_quantized_equals_transformers_layout(base_dir, bnb_dir, tmp_path):
    """jlora's export of the NF4 base holds the very tensors transformers + bitsandbytes save."""
    jlora.save_quantized(jlora.load_hf(base_dir, quantize="nf4"), tmp_path)
    ours, theirs = load_file(str(tmp_path / "model.safetensors")), load_file(str(bnb_dir / "model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
        assert ours[k].tobytes() == theirs[k].tobytes(), k
    ours_q = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    theirs_q = json.loads((bnb_dir / "config.json").read_text())["quantization_config"]
    assert ours_q == theirs_q


def test_save_quantized_loads_in_transformers(qlora_model, ids, ref, rel, tmp_path):
    jlora.save_quantized(qlora_model, tmp_path)
    assert not any("lora" in k for k in load_file(str(tmp_path / "model.safetensors")))  # the base only
    want = ref.logits(ref.load_bnb(tmp_path), ids)
    base = jlora.load_hf(tmp_path)
    assert rel(np.asarray(base(ids)), want) <= 1e-4


def test_qlora_adapter_loads_in_peft_on_bitsandbytes_base(qlora_model, bnb_dir, ids, ref, rel, tmp_path):
    ours = np.asarray(qlora_model(ids))
    jlora.save_pretrained(qlora_model, tmp_path / "adapter")
    model = peft.PeftModel.from_pretrained(ref.load_bnb(bnb_dir), tmp_path / "adapter").eval()
    want = ref.logits(model, ids)
    with model.disable_adapter():
        plain = ref.logits(model, ids)
    assert rel(plain, want) > 1e-3, "the adapter must change the logits, or this test proves nothing"
    err = rel(ours, want)
    assert err <= 1e-4, err


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_merged_export_is_a_plain_checkpoint(qlora_model, ids, hf_model, ref, rel, tmp_path, dtype):
    """Merged export dequantizes W, adds scaling * B A, and writes a checkpoint plain transformers loads."""
    jlora.save_merged(qlora_model, tmp_path, dtype=dtype)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in config
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert {t.dtype.name for t in tensors.values()} == {dtype or "float32"}
    assert all(not k.endswith(("absmax", "quant_map")) and ".quant_state." not in k for k in tensors)
    want = ref.logits(hf_model(tmp_path), ids)
    ours = np.asarray(qlora_model(ids))
    assert rel(ours, want) <= (1e-5 if dtype is None else 2e-2)


def test_save_quantized_replaces_the_previous_layout(base_dir, qlora_model, ids, ref, rel, tmp_path):
    """Single file (A: the plain NF4 base) then shards (B: another quantization) into one dir loads B (issue 16.1)."""
    a = jlora.load_hf(base_dir, quantize=jlora.NF4Config(blocksize=128))
    out = tmp_path / "q"
    jlora.save_quantized(a, out)
    jlora.save_quantized(qlora_model, out, shard_bytes=20_000)
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" not in names and "model.safetensors.index.json" in names, names
    want = np.asarray(jlora.load_hf(base_dir, quantize="nf4")(ids))
    sep = rel(np.asarray(a(ids)), want)
    assert sep > 1e-3, "A and B must differ, or this test proves nothing"
    # within 1% of the A-B gap: float32 rounding (~1e-6) cannot reach it, loading A instead of B would
    assert rel(np.asarray(jlora.load_hf(out)(ids)), want) <= 1e-2 * sep
    assert rel(ref.logits(ref.load_bnb(out), ids), want) <= 1e-2 * sep
