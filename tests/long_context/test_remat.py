"""Remat policies (jlora.remat) change what the backward stores, never what it computes: the loss and every
LoRA gradient under each policy equal PEFT's (torch autograd, float64 truth) within PEFT's own float32 error.

The memory each policy saves is checked where XLA honours it: XLA:CPU undoes rematerialization in a loop of
layers (its compiled temporaries are the same with and without jax.checkpoint, even for a plain tanh MLP
stack) but keeps it inside a scan, so the order none > dots > full comes from scanned models
(tests/long_context/test_remat_memory.py) and from libtpu compiles with offload's host bytes
(tests/long_context/test_remat_tpu.py, slow).
"""
import numpy as np
import peft
import pytest
import torch
from flax import nnx

import jax
import jax.numpy as jnp
import jlora
from jlora.attention import BlockSizes, use_attention
from jlora.remat import POLICIES, call_layer, checkpoint_policy, policy_name, projection_output
from jlora.train.loss import token_loss_sum
from jlora.train.state import SplitModel
from tests.peft_checks import peft_loss_and_lora_grads


def _batch(rows=2, t=23):
    rng = np.random.RandomState(7)
    tokens = rng.randint(3, 96, (rows, t + 1))
    return {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
            "loss_mask": (rng.rand(rows, t) > 0.2).astype(np.int32),
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (rows, t)),
            "segment_ids": np.ones((rows, t), np.int32)}


def test_every_policy_gives_peft_gradients(checkpoint, hf_model, tmp_path, close32):
    """Mistral (sliding window 8) on 23 positions, blockwise attention in 8 x 8 blocks (its custom VJP runs
    inside the checkpointed layer), chunked loss: loss and LoRA gradients per policy against PEFT."""
    path = checkpoint("mistral")
    model = jlora.get_peft_model(jlora.load_hf(path), jlora.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False),
                                 rngs=nnx.Rngs(3))
    use_attention(model, "blockwise", block_sizes=BlockSizes(8, 8))
    batch = _batch()
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    jlora.save_pretrained(model, tmp_path / "a")
    ref = peft.PeftModel.from_pretrained(hf_model(path), tmp_path / "a", is_trainable=True)
    loss32, grads32 = peft_loss_and_lora_grads(ref, batch, torch.float32)
    loss64, grads64 = peft_loss_and_lora_grads(ref, batch, torch.float64)
    for policy in POLICIES:
        model.remat = policy
        split = SplitModel.of(model)
        value, grads = jax.jit(jax.value_and_grad(
            lambda p: token_loss_sum(split.model(p, split.frozen), jbatch, chunk_tokens=16)[0]))(split.params())
        close32(np.float64(value), np.float64(loss32), np.float64(loss64), what=f"{policy}: loss")
        assert set(grads) == set(grads64), policy
        for k in grads64:
            assert np.abs(grads64[k]).max() > 0, k
            close32(np.asarray(grads[k]), grads32[k], grads64[k], what=f"{policy}: {k}")


def test_policies_store_what_they_say():
    """What jax.checkpoint keeps for the backward of one layer-like function: "full" only its inputs,
    "dots" the two named projections' outputs too, "offload" the named input on the host (no device residual)."""
    from jax._src.ad_checkpoint import saved_residuals

    class Layer(nnx.Module):
        def __call__(self, h, w):  # two projections, named as the model names its own (projection_output)
            return h + jnp.tanh(projection_output(jnp.tanh(projection_output(h @ w[0])) @ w[1]))

    def residuals(policy):
        saved = saved_residuals(lambda h, w: call_layer(Layer(), policy, h, w), jnp.ones((4, 8)), jnp.ones((2, 8, 8)))
        return [(str(aval), why.split(" from ")[0].strip()) for aval, why in saved]

    assert residuals("full") == [("float32[4,8]", "from the argument h"), ("float32[2,8,8]", "from the argument w")]
    assert residuals("dots") == residuals("full") + [("float32[4,8]", "named 'jlora_projection'")] * 2
    assert residuals("offload") == [("float32[2,8,8]", "from the argument w"), ("float32<host>[4,8]", "output of device_put")]
    assert len(residuals("none")) > len(residuals("dots"))


def test_policy_names():
    assert [policy_name(x) for x in (True, False, None, "dots")] == ["full", "none", "none", "dots"]
    assert checkpoint_policy("full") is None
    with pytest.raises(ValueError, match="'host' is not one of none, dots, full, offload"):
        policy_name("host")
