"""Shared fixtures: tiny Llama / Mistral / Qwen2 checkpoints built with transformers (the independent
reference) from a config and saved with `save_pretrained`."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a libtpu install must not make tests look for a TPU
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton kernels are checked under its interpreter; the flag must be set before any module (peft and
# bitsandbytes import triton) lets @triton.jit decorate a kernel.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests.hf_checkpoints import built_once, save_random_model  # noqa: E402
from tests.numerics import (EPS32, float32_close, rel_err, torch_logits32_and_64,  # noqa: E402,F401
                            transformers_model)

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)

FAMILIES = {
    "llama": ("LlamaConfig", dict(rope_theta=10000.0)),
    "llama3": ("LlamaConfig", dict(rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "llama-linear": ("LlamaConfig", dict(rope_scaling=dict(rope_type="linear", factor=2.0))),
    "llama-tied": ("LlamaConfig", dict(tie_word_embeddings=True, num_key_value_heads=4)),
    "mistral": ("MistralConfig", dict(sliding_window=8, head_dim=16)),
    "qwen2": ("Qwen2Config", dict(rope_theta=1000000.0)),
}


def make_checkpoint(family: str, out_dir, seed: int = 0):
    """A random transformers model of `family` (non-trivial norms and biases), saved as safetensors."""
    import transformers

    cls_name, extra = FAMILIES[family]
    return save_random_model(getattr(transformers, cls_name)(**{**TINY, **extra}), out_dir, seed=seed, bias_std=0.1)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(family) -> path of a tiny HF checkpoint dir, built once per session."""
    get = built_once(tmp_path_factory, make_checkpoint, "hf")
    return lambda family="llama": get(family)


@pytest.fixture
def hf_model():
    """hf_model(path) -> the transformers model in float32, eval mode."""
    return transformers_model


@pytest.fixture
def rel():
    return rel_err


@pytest.fixture
def close32():
    return float32_close


@pytest.fixture
def logits32_and_64():
    return torch_logits32_and_64


def make_packed_row(lengths=(7, 12, 5), pad: int = 4, seed: int = 4):
    """(examples, ids, segment_ids, positions): random examples packed into one row [1, sum + pad], each
    example its own segment (1, 2, ...) with positions from 0, then `pad` padding positions (segment 0)."""
    import numpy as np
    rng = np.random.RandomState(seed)
    examples = [rng.randint(3, 96, n) for n in lengths]
    row = np.concatenate(examples)[None]
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[None]
    pos = np.concatenate([np.arange(n) for n in lengths])[None]
    row, seg, pos = (np.pad(a, ((0, 0), (0, pad))) for a in (row, seg, pos))
    return examples, row, seg, pos


@pytest.fixture
def packed_row():
    return make_packed_row


@pytest.fixture(scope="session")
def default_base(tmp_path_factory):
    """The embedded default base checkpoint (tiny Llama + tokenizer), built once per session."""
    from jlora.default import build_default_base
    return build_default_base(tmp_path_factory.mktemp("default-base"))
