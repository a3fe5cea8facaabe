"""One optimizer step: its loss and gradients equal PEFT's (torch autograd), and 8x1, 4x2, 1x8 agree."""
import numpy as np
import optax
import peft
import pytest
import torch
from flax import nnx

import jax
import jax.numpy as jnp
import jlora
from jlora.train.state import SplitModel
from jlora.train.step import make_train_step

ROWS, T = 8, 24


def _batch():
    """8 rows of uneven length: row i has 6 + 2i real tokens, the rest padding; loss on the second half."""
    rng = np.random.RandomState(0)
    b = {k: np.zeros((ROWS, T), np.int32) for k in ("inputs", "targets", "loss_mask", "positions", "segment_ids")}
    for i in range(ROWS):
        n = 6 + 2 * i
        tokens = rng.randint(3, 96, n + 1)
        b["inputs"][i, :n], b["targets"][i, :n] = tokens[:-1], tokens[1:]
        b["loss_mask"][i, n // 2:n] = 1
        b["positions"][i, :n] = np.arange(n)
        b["segment_ids"][i, :n] = 1
    return b


def _model(checkpoint):
    return jlora.get_peft_model(jlora.load_hf(checkpoint("llama")),
                                jlora.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False), rngs=nnx.Rngs(3))


def _sgd_step(model, batch, accum):
    """One SGD(lr=1) step: returns (loss, grads as {name: array})."""
    split = SplitModel.of(model)
    params = split.params()
    tx = optax.sgd(1.0)
    step = jax.jit(make_train_step(split, tx))
    shaped = {k: jnp.asarray(v.reshape(accum, -1, T)) for k, v in batch.items()}
    new, _, m = step(params, tx.init(params), split.frozen, shaped, jax.random.key(0), jnp.asarray(0))
    return float(m["loss"]), {k: np.asarray(params[k]) - np.asarray(new[k]) for k in params}


def test_loss_and_grads_equal_peft(checkpoint, hf_model, tmp_path, rel):
    model = _model(checkpoint)
    batch = _batch()
    loss, grads = _sgd_step(model, batch, 1)

    jlora.save_pretrained(model, tmp_path / "a")
    ref = peft.PeftModel.from_pretrained(hf_model(checkpoint("llama")), tmp_path / "a", is_trainable=True)
    attn = torch.tensor(batch["segment_ids"] > 0)
    logits = ref(torch.tensor(batch["inputs"], dtype=torch.long), attention_mask=attn.long()).logits
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                           torch.tensor(batch["targets"], dtype=torch.long).reshape(-1),
                                           reduction="none")
    mask = torch.tensor(batch["loss_mask"], dtype=torch.float32).reshape(-1)
    ref_loss = (ce * mask).sum() / mask.sum()
    ref_loss.backward()
    assert abs(loss - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    name = "model.layers.1.mlp.down_proj"
    torch_a = ref.base_model.model.model.layers[1].mlp.down_proj.lora_A["default"].weight.grad.numpy().T
    torch_b = ref.base_model.model.model.layers[1].mlp.down_proj.lora_B["default"].weight.grad.numpy().T
    assert rel(grads[f"{name}.lora.a"], torch_a) <= 1e-4
    assert rel(grads[f"{name}.lora.b"], torch_b) <= 1e-4


@pytest.mark.parametrize("accum", [2, 8])
def test_accumulation_is_exact(checkpoint, rel, accum):
    model = _model(checkpoint)
    batch = _batch()
    loss1, grads1 = _sgd_step(model, batch, 1)
    loss_n, grads_n = _sgd_step(model, batch, accum)
    assert abs(loss_n - loss1) <= 1e-5 * abs(loss1)
    for k in grads1:
        assert rel(grads_n[k], grads1[k]) <= 1e-5, k


def test_per_microbatch_mean_would_differ(checkpoint):
    """The uneven rows make a per-micro-batch mean differ, so the exactness test above can fail."""
    counts = _batch()["loss_mask"].sum(1)
    per_row_mean_weighting = np.full(ROWS, 1 / ROWS)
    token_weighting = counts / counts.sum()
    assert np.abs(per_row_mean_weighting - token_weighting).max() > 0.05
