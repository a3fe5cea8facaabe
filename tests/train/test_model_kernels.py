"""The model routed through jlora.kernels (`use_kernels`) keeps PEFT's logits and the plain path's gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
from flax import nnx

import jlora
from jlora.cli import main
from jlora.train.state import SplitModel
from jlora.train.step import make_train_step


def _adapted(checkpoint, quantize=None):
    return jlora.get_peft_model(jlora.load_hf(checkpoint("llama"), quantize=quantize),
                                jlora.LoraConfig(r=4, init_lora_weights=False), rngs=nnx.Rngs(2))


def test_kernel_path_logits_equal_peft(checkpoint, hf_model, rel, tmp_path):
    model = jlora.use_kernels(_adapted(checkpoint), "xla")
    ids = np.random.RandomState(0).randint(0, 96, (2, 16))
    jlora.save_pretrained(model, tmp_path / "a")
    ref = peft.PeftModel.from_pretrained(hf_model(checkpoint("llama")), tmp_path / "a").eval()
    with torch.no_grad():
        want = ref(torch.tensor(ids)).logits.numpy()
    assert rel(model(ids), want) <= 1e-5


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_kernel_path_gradients_equal_plain_path(checkpoint, rel, quantize):
    rng = np.random.RandomState(1)
    batch = {k: jnp.asarray(v.astype(np.int32))[None] for k, v in dict(
        inputs=rng.randint(0, 96, (2, 12)), targets=rng.randint(0, 96, (2, 12)), loss_mask=np.ones((2, 12)),
        positions=np.tile(np.arange(12), (2, 1)), segment_ids=np.ones((2, 12))).items()}

    def grads(model):
        split = SplitModel.of(model)
        params, tx = split.params(), optax.sgd(1.0)
        new, _, _ = jax.jit(make_train_step(split, tx))(params, tx.init(params), split.frozen, batch,
                                                        jax.random.key(0), jnp.asarray(0))
        return {k: np.asarray(params[k]) - np.asarray(new[k]) for k in params}

    plain = grads(_adapted(checkpoint, quantize))
    fused = grads(jlora.use_kernels(_adapted(checkpoint, quantize), "xla"))
    for k in plain:
        assert rel(fused[k], plain[k]) <= 1e-5, k


def test_unknown_impl_is_refused(checkpoint):
    with pytest.raises(ValueError, match="not one of"):
        jlora.use_kernels(_adapted(checkpoint), "cuda")


def test_train_with_kernels_flag(tmp_path):
    assert main(["train", "--out", str(tmp_path / "r"), "--kernels", "auto", "--steps", "3", "--batch-size", "2",
                 "--seq-len", "48", "--eval-every", "0", "--no-progress"]) == 0
