"""The activation estimate against what XLA allocates for jlora's compiled train step (no remat)."""
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import jlora
from jlora.ranks.memory import activation_bytes
from jlora.train.optimizer import make_optimizer
from jlora.train.state import SplitModel
from jlora.train.step import make_train_step

HF = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=4000, hidden_size=128,
          intermediate_size=352, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def test_estimate_within_a_factor_of_xla_temp_memory():
    batch, seq, r = 4, 256, 16
    config = jlora.LlamaConfig.from_hf_dict(HF)
    model = nnx.eval_shape(lambda: jlora.get_peft_model(jlora.LlamaForCausalLM(config, rngs=nnx.Rngs(0)),
                                                        jlora.LoraConfig(r=r), rngs=nnx.Rngs(0)))
    model.train()
    split = SplitModel.of(model)
    tx = make_optimizer(lambda s: 1e-3)
    params = split.params()
    batch_shape = {k: jax.ShapeDtypeStruct((1, batch, seq), jnp.int32)
                   for k in ("inputs", "targets", "positions", "segment_ids", "loss_mask")}
    compiled = jax.jit(make_train_step(split, tx)).lower(
        params, jax.eval_shape(tx.init, params), split.frozen, batch_shape, jax.random.key(0), jnp.int32(0)).compile()
    xla = compiled.memory_analysis().temp_size_in_bytes
    estimate = activation_bytes(config, batch=batch, seq=seq, r=r, dtype="float32")
    assert 0.5 <= estimate / xla <= 2.0, (estimate, xla)
