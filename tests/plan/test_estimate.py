"""Abstract-evaluation pieces of `jlora plan`, on CPU: activation extrapolation, array sizes, the remat step."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jlora
from jlora.plan.arguments import ArraySizes, trace_safe_split
from jlora.plan.estimate import ActivationModel, saved_activation_bytes
from jlora.plan.model import abstract_lora_model, lora_config
from jlora.train.optimizer import make_optimizer
from jlora.train.step import make_train_step

TINY = jlora.LlamaConfig.from_hf_dict(dict(
    architectures=["LlamaForCausalLM"], vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))


def test_extrapolation_from_two_layers_and_two_rows_equals_tracing_the_whole_model():
    build = functools.partial(abstract_lora_model, lora=lora_config(4), dtype="bfloat16")
    model = ActivationModel.measure(build, TINY, seq_len=16)
    for remat in (False, True):
        m = build(TINY)
        m.remat = remat
        direct = saved_activation_bytes(m, batch_size=3, seq_len=16)
        per_row, const = (model.full, model.const_full) if remat else (model.none, model.const_none)
        assert [3 * r + c for r, c in zip(per_row, const)] == list(direct[:2]), remat
    assert sum(model.full) < sum(model.none)


def test_array_sizes_count_every_parameter_once():
    m = abstract_lora_model(TINY, lora=lora_config(4), dtype="bfloat16")
    sizes = ArraySizes.of(m)
    c = TINY
    per_layer = sum(i * o for i, o in c.linear_shapes().values()) + 2 * c.hidden_size
    frozen = c.num_hidden_layers * per_layer + 2 * c.vocab_size * c.hidden_size + c.hidden_size
    adapters = c.num_hidden_layers * sum(4 * (i + o) for i, o in c.linear_shapes().values())
    total = sizes.total()
    assert total["frozen"] == 2 * frozen          # bfloat16
    assert total["params"] == 4 * adapters        # float32 adapters
    assert total["opt_state"] == 2 * total["params"]
    # fsdp=2 halves every kernel (all dims here are even) and leaves norms whole.
    half = sizes.per_device({"data": 1, "fsdp": 2, "tensor": 1})
    norms = 2 * (2 * c.num_hidden_layers + 1) * c.hidden_size
    assert half["frozen"] == (total["frozen"] - norms) // 2 + norms


def test_remat_step_equals_the_plain_step():
    """The step `jlora plan` compiles with remat (frozen Variables rebuilt in the trace) computes what
    the plain step computes: same loss, same gradient."""
    def run(remat):
        model = jlora.get_peft_model(jlora.init_random(TINY), jlora.LoraConfig(r=4, init_lora_weights=False),
                                     rngs=nnx.Rngs(0))
        model.remat = remat
        split = trace_safe_split(model)
        tx = make_optimizer(lambda s: 1e-2)
        params = split.params()
        rng = np.random.RandomState(0)
        batch = {k: jnp.asarray(rng.randint(1, 96, (2, 4, 16)), jnp.int32)
                 for k in ("inputs", "targets", "loss_mask", "positions", "segment_ids")}
        batch["positions"] = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (2, 4, 16))
        batch["segment_ids"] = jnp.ones((2, 4, 16), jnp.int32)
        _, _, m = jax.jit(make_train_step(split, tx))(params, tx.init(params), split.frozen, batch,
                                                       jax.random.key(0), jnp.asarray(0))
        return {k: float(v) for k, v in m.items()}

    plain, remat = run(False), run(True)
    assert abs(remat["loss"] - plain["loss"]) <= 1e-6 * abs(plain["loss"])
    assert abs(remat["grad_norm"] - plain["grad_norm"]) <= 1e-5 * plain["grad_norm"]
