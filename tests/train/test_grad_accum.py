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


def _capture_grads() -> optax.GradientTransformation:
    """An optimizer that keeps the step's gradients in its state (exact, no p - p' rounding)."""
    def init(params):
        return {"grads": jax.tree.map(jnp.zeros_like, params)}

    def update(grads, state, params=None):
        return jax.tree.map(jnp.zeros_like, grads), {"grads": grads}

    return optax.GradientTransformation(init, update)


def _sgd_step(model, batch, accum):
    """One step: returns (loss, grads as {name: array})."""
    split = SplitModel.of(model)
    params = split.params()
    tx = _capture_grads()
    step = jax.jit(make_train_step(split, tx))
    shaped = {k: jnp.asarray(v.reshape(accum, -1, T)) for k, v in batch.items()}
    _, state, m = step(params, tx.init(params), split.frozen, shaped, jax.random.key(0), jnp.asarray(0))
    return float(m["loss"]), {k: np.asarray(v) for k, v in state["grads"].items()}


def _peft_loss_and_grads(ref, batch, dtype):
    """PEFT's loss (sum of masked token losses / target tokens) and every adapter gradient, Flax layout."""
    ref = ref.to(dtype)
    ref.zero_grad()
    attn = torch.tensor(batch["segment_ids"] > 0)
    logits = ref(torch.tensor(batch["inputs"], dtype=torch.long), attention_mask=attn.long()).logits
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                           torch.tensor(batch["targets"], dtype=torch.long).reshape(-1),
                                           reduction="none")
    mask = torch.tensor(batch["loss_mask"], dtype=dtype).reshape(-1)
    loss = (ce * mask).sum() / mask.sum()
    loss.backward()
    grads = {}
    for name, p in ref.named_parameters():
        if p.requires_grad:  # base_model.model.model.layers.1.mlp.down_proj.lora_A.default.weight
            module = name.removeprefix("base_model.model.").split(".lora_")[0]
            kind = "a" if ".lora_A." in name else "b"
            grads[f"{module}.lora.{kind}"] = p.grad.double().numpy().T
    return loss.item(), grads


def test_loss_and_grads_equal_peft(checkpoint, hf_model, tmp_path, close32):
    """Every adapted module's A and B gradients equal PEFT's: jlora's float32 error against PEFT in float64
    is within a small factor of PEFT's own float32 error (see conftest.float32_close)."""
    model = _model(checkpoint)
    batch = _batch()
    loss, grads = _sgd_step(model, batch, 1)

    jlora.save_pretrained(model, tmp_path / "a")
    ref = peft.PeftModel.from_pretrained(hf_model(checkpoint("llama")), tmp_path / "a", is_trainable=True)
    loss32, grads32 = _peft_loss_and_grads(ref, batch, torch.float32)
    loss64, grads64 = _peft_loss_and_grads(ref, batch, torch.float64)
    close32(np.float64(loss), np.float64(loss32), np.float64(loss64), what="loss")
    assert set(grads) == set(grads64) and len(grads) == 2 * 2 * 7, sorted(grads64)
    for k in grads64:
        assert np.abs(grads64[k]).max() > 0, k
        close32(grads[k], grads32[k], grads64[k], what=k)


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
