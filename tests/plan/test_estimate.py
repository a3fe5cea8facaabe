"""Abstract-evaluation pieces of `jlora plan`, on CPU: activation extrapolation, array sizes, the remat step."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jlora
from jlora.plan.arguments import ArraySizes, trace_safe_split
from jlora.attention import BlockSizes, use_attention
from jlora.plan.estimate import ActivationModel, saved_activation_bytes
from jlora.remat import POLICIES
from jlora.plan.model import abstract_lora_model, lora_config
from jlora.train.optimizer import make_optimizer
from jlora.train.step import make_train_step

TINY = jlora.LlamaConfig.from_hf_dict(dict(
    architectures=["LlamaForCausalLM"], vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))


def test_extrapolation_from_two_layers_and_two_rows_equals_tracing_the_whole_model():
    build = functools.partial(abstract_lora_model, lora=lora_config(4), dtype="bfloat16")
    model = ActivationModel.measure(build, TINY, seq_len=16)
    for remat in POLICIES:
        m = build(TINY)
        m.remat = remat
        *direct, _, host = saved_activation_bytes(m, batch_size=3, seq_len=16)
        assert [3 * r + c for r, c in zip(model.per_row[remat], model.const[remat])] == direct, remat
        assert 3 * model.host_per_row[remat] == host, remat
    assert sum(model.full) < sum(model.none)
    # offload keeps each layer's input [rows, T, hidden] (bf16) in host memory, not on the device
    assert model.host_per_row["offload"] == TINY.num_hidden_layers * 16 * TINY.hidden_size * 2
    assert sum(model.per_row["offload"]) < sum(model.full) and model.host_per_row["full"] == 0


def test_blockwise_attention_and_chunked_loss_are_linear_in_seq_len():
    """The estimate sees what the step saves: blockwise attention and the chunked loss keep nothing of size
    T x T or T x vocab, so 4x the tokens save 4x the bytes; the reference attention's [T, T] scores make it grow faster."""
    def saved(attention, chunk, t):
        m = use_attention(abstract_lora_model(TINY, lora=lora_config(4), dtype="bfloat16"), attention,
                          block_sizes=BlockSizes(16, 16))
        replicated, sharded, scores, _ = saved_activation_bytes(m, batch_size=1, seq_len=t, chunk_tokens=chunk)
        return replicated + sharded, scores
    (short, no_scores), (long, _) = saved("blockwise", 32, 64), saved("blockwise", 32, 256)
    assert no_scores == 0 and 3.9 <= long / short <= 4.1, long / short
    (short, scores), (long, _) = saved("reference", None, 64), saved("reference", None, 256)
    assert scores > 0 and long / short > 5, long / short  # [T, T] scores: more than linear


def test_quadratic_through_three_points():
    from jlora.plan.seq_len import _quadratic
    a, b, c = _quadratic([(1, 6), (2, 17), (4, 57)])  # 1 + 2 T + 3 T^2
    assert np.allclose([a, b, c], [1, 2, 3])


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
