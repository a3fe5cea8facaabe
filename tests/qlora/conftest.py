"""transformers + bitsandbytes (CPU) as the reference for QLoRA: a tiny Llama, its 4-bit NF4 checkpoint.

Feature sizes are multiples of 64 so that every row holds whole NF4 blocks: bitsandbytes 0.50's
AVX-512 CPU dequantize kernel mis-indexes absmax otherwise (see jlora/nf4/dequantize.py).

On a CPU with AVX-512 BF16, bitsandbytes 0.50's `Linear4bit` repacks its weight at the first forward
in eval mode and from then on runs a bfloat16-absmax CPU kernel (rel error ~4e-3 against its own
`dequantize_4bit`). `load_bnb` turns that off, so the reference is bitsandbytes' exact path:
`dequantize_4bit` then a float32 matmul (what it runs for training and on GPU).
"""
import types

import numpy as np
import pytest

SIZES = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False)


def bnb_config():
    import torch
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32)


def load_bnb(path, quantize: bool = False, dtype="float32"):
    """transformers + bitsandbytes 4-bit model from `path` (quantizing it while loading if `quantize`)."""
    import bitsandbytes as bnb
    import torch
    import transformers
    kw = dict(quantization_config=bnb_config()) if quantize else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=getattr(torch, dtype),
                                                              **kw).eval()
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    return model


def torch_logits(model, ids) -> np.ndarray:
    import torch
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


@pytest.fixture(scope="session")
def ref():
    """The reference helpers: ref.load_bnb(path, quantize=False), ref.logits(torch_model, ids)."""
    return types.SimpleNamespace(load_bnb=load_bnb, logits=torch_logits, bnb_config=bnb_config)


@pytest.fixture(scope="session")
def ids():
    return np.random.RandomState(0).randint(0, SIZES["vocab_size"], (2, 12))


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory):
    """A float32 transformers Llama checkpoint (random, non-trivial norms)."""
    import torch
    import transformers
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**SIZES), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randn_like(p) * 0.1 + 1.0)
    out = tmp_path_factory.mktemp("qlora-base")
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def bnb_dir(base_dir, tmp_path_factory):
    """base_dir quantized by transformers + bitsandbytes (NF4, double quant, blocksize 64) and saved."""
    out = tmp_path_factory.mktemp("qlora-bnb")
    load_bnb(base_dir, quantize=True).save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def bnb_logits(bnb_dir, ids):
    """Logits of transformers + bitsandbytes on the 4-bit checkpoint, float32 compute."""
    return torch_logits(load_bnb(bnb_dir), ids)
