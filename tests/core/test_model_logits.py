"""jlora's forward pass equals transformers' AutoModelForCausalLM on the same checkpoint (float32)."""
import numpy as np
import pytest
import torch
from flax import nnx

import jlora



@pytest.mark.parametrize("family", ["llama", "llama3", "llama-linear", "llama-tied", "mistral", "qwen2"])
def test_logits_equal_transformers(family, checkpoint, hf_model, close32, logits32_and_64):
    path = checkpoint(family)
    ids = np.random.RandomState(1).randint(0, 96, (2, 24))
    want, want64 = logits32_and_64(hf_model(path), ids)
    got = np.asarray(nnx.jit(lambda m, x: m(x))(jlora.load_hf(path), ids))  # one program: faster than op by op
    assert got.shape == want.shape
    close32(got, want, want64, what=family)


def test_bfloat16_load_is_close(checkpoint, hf_model, rel):
    path = checkpoint("llama")
    ids = np.random.RandomState(2).randint(0, 96, (1, 16))
    with torch.no_grad():
        want = hf_model(path)(torch.tensor(ids)).logits.numpy()
    model = jlora.load_hf(path, dtype="bfloat16")
    assert model.model.layers[0].self_attn.q_proj.kernel[...].dtype == np.dtype("bfloat16") or \
        str(model.model.layers[0].self_attn.q_proj.kernel[...].dtype) == "bfloat16"
    assert rel(np.asarray(nnx.jit(lambda m, x: m(x))(model, ids), np.float32), want) <= 5e-2
