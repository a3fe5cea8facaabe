"""The compiled LoRA train step's temporary memory grows about linearly in the sequence length with the
blockwise attention and the chunked loss (issue 11): 4x the tokens cost <= 5x the temporaries. The
materialized reference attention is quadratic, which the same bound catches (so the check can fail).

Only compiles (XLA:CPU's memory analysis of the whole step: forward, backward, optimizer); runs nothing.
"""
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import jlora
from jlora.attention import use_attention
from jlora.llama import init_random
from jlora.llama_config import LlamaConfig
from jlora.train.state import SplitModel
from jlora.train.step import make_train_step

CONFIG = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=1000, max_position_embeddings=8192, rms_norm_eps=1e-5)


def _temp_bytes(backend: str, seq_len: int) -> int:
    model = jlora.get_peft_model(init_random(LlamaConfig.from_hf_dict(CONFIG)),
                                 jlora.LoraConfig(r=8, lora_alpha=8), rngs=nnx.Rngs(1))
    use_attention(model, backend)
    split = SplitModel.of(model)
    params, tx = split.params(), optax.sgd(1e-3)
    batch = {k: jax.ShapeDtypeStruct((1, 1, seq_len), jnp.int32)
             for k in ("inputs", "targets", "loss_mask", "positions", "segment_ids")}
    compiled = jax.jit(make_train_step(split, tx)).lower(params, tx.init(params), split.frozen, batch,
                                                        jax.random.key(0), jnp.asarray(0)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("backend, short, long, linear", [("blockwise", 2048, 8192, True),
                                                          ("reference", 512, 2048, False)])
def test_temporaries_grow_linearly(backend, short, long, linear):
    ratio = _temp_bytes(backend, long) / _temp_bytes(backend, short)
    if linear:
        assert ratio <= 5, f"{backend}: T {short} -> {long} multiplied the step's temporaries by {ratio:.2f} (> 5)"
    else:
        assert ratio > 5, f"{backend}: expected quadratic growth (> 5x for 4x T), got {ratio:.2f}"
