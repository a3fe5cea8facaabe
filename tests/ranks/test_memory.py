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


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_bits_per_param_equal_bitsandbytes_storage(double_quant):
    """The NF4 storage every memory figure uses, against the bytes bitsandbytes' own quantize_4bit keeps."""
    torch = pytest.importorskip("torch")
    bnb = pytest.importorskip("bitsandbytes.functional")
    from jlora.memory import nf4_bits_per_param
    w = torch.randn(8, 64 * 256)
    q, state = bnb.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    tensors = [q, state.absmax] + ([state.state2.absmax] if double_quant else [])
    bits = 8 * sum(t.numel() * t.element_size() for t in tensors) / w.numel()
    assert nf4_bits_per_param(64, double_quant=double_quant) == bits


def test_adapter_state_bytes_equal_jloras_optimizer():
    """12 bytes per trainable parameter: the float32 adapters plus the state jlora's own optimizer allocates."""
    from jlora.memory import tree_bytes
    from jlora.ranks.memory import adapter_state_bytes
    config = jlora.LlamaConfig.from_hf_dict(HF)
    model = nnx.eval_shape(lambda: jlora.get_peft_model(jlora.LlamaForCausalLM(config, rngs=nnx.Rngs(0)),
                                                        jlora.LoraConfig(r=8), rngs=nnx.Rngs(0)))
    params = SplitModel.of(model).params()
    trainable = sum(x.size for x in jax.tree.leaves(params))
    opt_state = jax.eval_shape(make_optimizer(lambda s: 1e-3).init, params)
    counted = tree_bytes(params) + tree_bytes(opt_state)
    assert 0 <= counted - adapter_state_bytes(trainable) <= 64  # optax's step counters: a few scalars


def test_ranks_and_plan_count_the_same_step_gradients():
    """`jlora ranks` and `jlora plan` count the step's float32 gradient and accumulator alike (was 4 vs 8 B)."""
    from jlora.plan.estimate import ActivationModel, estimate_bytes_per_device
    from jlora.ranks.memory import GRADIENT_BYTES_PER_PARAM
    trainable = 1_000_000
    zero = {policy: (0.0, 0.0) for policy in ("none", "dots", "full", "offload")}
    nothing = ActivationModel(per_row=zero, const=zero, host_per_row={p: 0.0 for p in zero}, layers=1)
    plan_grads = estimate_bytes_per_device(0, 4 * trainable, nothing, rows_per_device=1, remat="none")
    assert plan_grads == GRADIENT_BYTES_PER_PARAM * trainable == 8 * trainable


def test_one_byte_format_for_ranks_and_memory_report():
    from jlora.memory import format_bytes
    from jlora.ranks.memory import base_weight_bytes
    from jlora.ranks.table import format_report, rank_rows
    assert [format_bytes(n) for n in (512, 1536, 3 * 2**30, 2**50)] == ["512 B", "1.50 KiB", "3.00 GiB",
                                                                        "1,024.00 TiB"]
    config = jlora.LlamaConfig.from_hf_dict(HF)
    rows = rank_rows(config, batch=1, seq=16)
    text = "\n".join(format_report(config, "tiny", rows, batch=1, seq=16, dtype="bfloat16", quantize=None))
    assert f"weights {format_bytes(base_weight_bytes(config, 'bfloat16'))} " in text
    assert format_bytes(rows[0]["adapter_state_bytes"]) in text
