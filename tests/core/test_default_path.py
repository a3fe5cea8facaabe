"""The path a model takes without `use_kernels` (issue 17): the custom-VJP kernels over XLA dots, with the
plain jnp path (`use_kernels(model, None)`) as the reference; LoRA dropout on every path (issue 16 item 8)."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jlora
from jlora.llama import DEFAULT_KERNELS
from jlora.llama import Linear
from jlora.train.state import SplitModel
from jlora.train.step import make_train_step


def _model(checkpoint, dropout=0.0, dtype="float32"):
    model = jlora.load_hf(checkpoint("llama"), dtype=dtype)
    return jlora.get_peft_model(model, jlora.LoraConfig(r=4, lora_dropout=dropout, init_lora_weights=False),
                                rngs=nnx.Rngs(params=2, dropout=3))


def _grads(model):
    """One SGD(1) step of the training step: the adapter gradients, and the loss."""
    rng = np.random.RandomState(1)
    batch = {k: jnp.asarray(v.astype(np.int32))[None] for k, v in dict(
        inputs=rng.randint(0, 96, (2, 12)), targets=rng.randint(0, 96, (2, 12)), loss_mask=np.ones((2, 12)),
        positions=np.tile(np.arange(12), (2, 1)), segment_ids=np.ones((2, 12))).items()}
    model.train()
    split = SplitModel.of(model)
    params, tx = split.params(), optax.sgd(1.0)
    new, _, metrics = jax.jit(make_train_step(split, tx))(params, tx.init(params), split.frozen, batch,
                                                          jax.random.key(0), jnp.asarray(0))
    return {k: np.asarray(params[k]) - np.asarray(new[k]) for k in params}, float(metrics["loss"])


def _close(got, want, tol=1e-4):
    for k in want:
        scale = np.abs(want[k]).max()
        assert np.abs(got[k] - want[k]).max() <= tol * scale, k


def test_new_model_runs_the_default_kernels(checkpoint):
    model = _model(checkpoint)
    impls = {m.kernel_impl for _, m in nnx.iter_graph(model) if isinstance(m, Linear)}
    assert impls == {DEFAULT_KERNELS}


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_default_path_gradients_equal_plain_path(checkpoint, dropout):
    want, want_loss = _grads(jlora.use_kernels(_model(checkpoint, dropout), None))
    got, got_loss = _grads(_model(checkpoint, dropout))
    assert abs(got_loss - want_loss) <= 1e-5 * abs(want_loss)
    _close(got, want)


def test_dropout_with_fused_kernels_warns_once_and_keeps_gradients(checkpoint):
    want, _ = _grads(jlora.use_kernels(_model(checkpoint, 0.375), None))
    model = jlora.use_kernels(_model(checkpoint, 0.375), "pallas")
    with pytest.warns(UserWarning, match=r"lora_dropout=0.375: the fused 'pallas' kernels") as record:
        got, _ = _grads(model)
    assert len([w for w in record if "lora_dropout" in str(w.message)]) == 1
    _close(got, want)


def test_default_path_with_dropout_does_not_warn(checkpoint):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _grads(_model(checkpoint, 0.125))
    assert not [w for w in record if "lora_dropout" in str(w.message)]
