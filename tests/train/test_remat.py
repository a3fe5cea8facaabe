"""`remat=True` recomputes each layer in the backward pass and gives the same gradients (float32)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jlora
from jlora.train.state import SplitModel
from jlora.train.step import make_train_step


def _grads(model):
    split = SplitModel.of(model)
    params = split.params()
    rng = np.random.RandomState(0)
    batch = {k: jnp.asarray(v.astype(np.int32))[None] for k, v in dict(
        inputs=rng.randint(0, 96, (2, 12)), targets=rng.randint(0, 96, (2, 12)), loss_mask=np.ones((2, 12)),
        positions=np.tile(np.arange(12), (2, 1)), segment_ids=np.ones((2, 12))).items()}
    tx = optax.sgd(1.0)
    new, _, m = jax.jit(make_train_step(split, tx))(params, tx.init(params), split.frozen, batch,
                                                    jax.random.key(0), jnp.asarray(0))
    jaxpr = str(jax.make_jaxpr(lambda ids: model(ids))(batch["inputs"][0]))
    return {k: np.asarray(params[k]) - np.asarray(new[k]) for k in params}, jaxpr


def test_remat_gives_same_gradients_and_recomputes(checkpoint, rel):
    def model(remat):
        m = jlora.get_peft_model(jlora.load_hf(checkpoint("llama")), jlora.LoraConfig(r=4, init_lora_weights=False),
                                 rngs=nnx.Rngs(0))
        m.remat = remat
        return m
    plain, plain_jaxpr = _grads(model(False))
    remat, remat_jaxpr = _grads(model(True))
    assert "remat2[" not in plain_jaxpr and remat_jaxpr.count("remat2[") == 2  # one per layer
    for k in plain:
        assert rel(remat[k], plain[k]) <= 1e-5, k
