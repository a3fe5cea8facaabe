"""Scanned decoder layers (jlora/models/stacked.py): the same model as the loop, compiled once per period.

- logits of a scanned model equal transformers' (float32 vs float64 bounds) for Llama (period 1) and
  Gemma 2 with 5 layers (window/global alternating: period 2, two scanned groups plus a looped tail);
- a LoRA train step's gradients equal the loop model's (rel <= 1e-5), with remat inside the scan body;
- LoRA adapters and NF4 weights attached to a scanned model stack; the PEFT export of a scanned model is
  the loop model's, byte for byte;
- the lowered program of a scanned 8-layer model is about the size of the 2-layer one's (loop: ~4x).
"""
import numpy as np
import pytest
from flax import nnx

import jlora
from tests.hf_checkpoints import save_random_model
from jlora.models.stacked import ScannedLayers, is_stacked, stack_layers, unstack_layers, structural_period

GEMMA2 = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6, sliding_window=6,
              query_pre_attn_scalar=24, num_hidden_layers=5, attn_logit_softcapping=2.0,
              final_logit_softcapping=3.0)


@pytest.fixture(scope="module")
def gemma2_5(tmp_path_factory):
    """A 5-layer Gemma 2 checkpoint (sliding, full, sliding, full, sliding) with random norm weights."""
    import transformers
    return save_random_model(transformers.Gemma2Config(**GEMMA2), tmp_path_factory.mktemp("gemma2-5"),
                             norm_mean=0.0, norm_std=0.5, weight_std=0.25)


def _forward(model, ids):
    import jax
    graph, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, x: nnx.merge(graph, s)(x))(state, ids))


def _ids(vocab, seed=1, shape=(2, 24)):
    return np.random.RandomState(seed).randint(0, vocab, shape)


@pytest.mark.parametrize("which", ["llama", "gemma2"])
def test_scanned_logits_equal_transformers_and_loop(which, checkpoint, gemma2_5, hf_model, close32, logits32_and_64):
    path = checkpoint("llama") if which == "llama" else gemma2_5
    ids = _ids(96 if which == "llama" else 128)
    scanned = jlora.load_hf(path, scan_layers=True)
    assert is_stacked(scanned)
    stack = scanned.model.layers
    assert (stack.period, stack.groups, len(stack.tail)) == ((1, 2, 0) if which == "llama" else (2, 2, 1))
    want, want64 = logits32_and_64(hf_model(path), ids)
    got = _forward(scanned, ids)
    close32(got, want, want64, what=f"scanned {which}")
    loop = _forward(jlora.load_hf(path), ids)
    assert np.abs(got - loop).max() <= 1e-5 * np.abs(loop).max()


def test_stack_unstack_round_trip_is_exact(checkpoint):
    loop = jlora.load_hf(checkpoint("llama"))
    before = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(loop))}
    back = unstack_layers(stack_layers(jlora.load_hf(checkpoint("llama"))))
    after = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(back))}
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def _lora_grads(model, batch, remat):
    """{HF module name + .a/.b: gradient} of the summed token loss, through jax.grad of nnx.split state."""
    import jax
    from jlora.peft_model import adapted_modules
    from jlora.train.loss import token_loss_sum
    model.remat = remat
    graph, params, rest = nnx.split(model, nnx.LoRAParam, ...)

    def loss(p):
        return token_loss_sum(nnx.merge(graph, p, rest), batch, chunk_tokens=None)[0]
    grads = jax.jit(jax.grad(loss))(params)
    nnx.update(model, grads)  # the gradients where the parameters were: then read them by HF name
    return {f"{n}.{ab}": np.asarray(getattr(m.lora, ab)[...]) for n, m in adapted_modules(model) for ab in "ab"}


def test_scanned_lora_gradients_equal_loop(gemma2_5):
    """The scanned model with remat "full" (jax.checkpoint per layer inside the scan body) against the loop
    model without remat (the loop's gradients equal PEFT's: tests/models/test_gemma.py)."""
    remat = "full"
    cfg = jlora.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj", "down_proj"])
    ids = _ids(128, seed=8, shape=(2, 12))
    rng = np.random.RandomState(9)
    batch = dict(inputs=ids, targets=rng.randint(0, 128, ids.shape), loss_mask=(rng.rand(*ids.shape) > 0.3) * 1.0,
                 segment_ids=np.ones_like(ids), positions=np.broadcast_to(np.arange(ids.shape[1]), ids.shape))
    loop = jlora.get_peft_model(jlora.load_hf(gemma2_5), cfg, rngs=nnx.Rngs(3))
    scanned = jlora.get_peft_model(jlora.load_hf(gemma2_5, scan_layers=True), cfg, rngs=nnx.Rngs(3))
    a = scanned.model.layers.group[0].self_attn.q_proj.lora.a  # adapters stacked per pattern position
    assert is_stacked(scanned) and a.shape == (2, 32, 4)
    want, got = _lora_grads(loop, batch, "none"), _lora_grads(scanned, batch, remat)
    assert want.keys() == got.keys() and len(want) == 5 * 3 * 2
    for k in want:
        assert np.abs(want[k]).max() > 0, k
        assert np.abs(got[k] - want[k]).max() <= 1e-5 * np.abs(want[k]).max(), k


def test_scanned_peft_export_equals_loop(checkpoint, tmp_path):
    from safetensors.numpy import load_file
    cfg = jlora.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False)
    loop = jlora.get_peft_model(jlora.load_hf(checkpoint("llama")), cfg, rngs=nnx.Rngs(1))
    scanned = jlora.get_peft_model(jlora.load_hf(checkpoint("llama"), scan_layers=True), cfg, rngs=nnx.Rngs(1))
    jlora.save_pretrained(loop, tmp_path / "loop")
    jlora.save_pretrained(scanned, tmp_path / "scan")
    assert is_stacked(scanned)  # exporting reads layer views; the model stays scanned
    a, b = load_file(tmp_path / "loop/adapter_model.safetensors"), load_file(tmp_path / "scan/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert (tmp_path / "loop/adapter_config.json").read_text() == (tmp_path / "scan/adapter_config.json").read_text()


@pytest.mark.slow  # ~40 s under load: eager NF4 quantization twice
def test_nf4_and_rank_pattern(checkpoint):
    """NF4 weights stack (their code/absmax arrays on the leading axis); a rank_pattern that gives one
    layer another rank leaves no repeating period, so the model is one scanned step (the loop's program)."""
    ids = _ids(96)
    model = jlora.quantize_model(jlora.load_hf(checkpoint("llama"), scan_layers=True))
    assert is_stacked(model) and model.model.layers.groups == 2
    q = model.model.layers.group[0].self_attn.q_proj.kernel.get_value()
    assert q.codes.shape[0] == 2
    want = _forward(jlora.quantize_model(jlora.load_hf(checkpoint("llama"))), ids)
    assert np.abs(_forward(model, ids) - want).max() <= 1e-5 * np.abs(want).max()
    cfg = jlora.LoraConfig(r=4, rank_pattern={"layers.1.self_attn.q_proj": 8})
    model = jlora.get_peft_model(model, cfg, rngs=nnx.Rngs(0))
    assert structural_period(list(unstack_layers(model).model.layers)) == 2
    assert stack_layers(model).model.layers.groups == 1


def _lowered_size(layers: int, scan: bool) -> int:
    import jax
    from jlora.models import ModelConfig
    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = nnx.eval_shape(lambda: jlora.get_peft_model(jlora.init_random(config), jlora.LoraConfig(r=2),
                                                        rngs=nnx.Rngs(0)))  # shapes only: nothing to compute
    if scan:
        stack_layers(model)
        assert model.model.layers.group[0].mlp.up_proj.lora.b.shape == (layers, 2, 64)
    model.remat = "full"
    graph, params, rest = nnx.split(model, nnx.LoRAParam, ...)
    ids = np.zeros((1, 8), np.int32)

    def forward(p, rest):  # frozen weights as arguments: as closure constants they would fill the text
        return nnx.merge(graph, p, rest)(ids)
    return len(jax.jit(forward).lower(params, rest).as_text())


def test_program_size_does_not_grow_with_depth():
    """Property of scanning: the lowered program (forward, remat "full" per layer) of 8 layers is within 1.3x
    of 2 layers'; the loop's grows with depth. (Compile times for v5e: benchmarks/compile_time.py.)"""
    scan2, scan8 = _lowered_size(2, True), _lowered_size(8, True)
    loop2, loop8 = _lowered_size(2, False), _lowered_size(8, False)
    assert scan8 / scan2 < 1.3, (scan2, scan8)
    assert loop8 / loop2 > 2.5, (loop2, loop8)  # guard: the measure does see depth in the loop model


def test_lora_dropout_is_refused_not_silently_frozen():
    """Dropout's RNG counters would not advance through the scan: stacking such layers is an error."""
    from jlora.models import ModelConfig
    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = nnx.eval_shape(lambda: jlora.get_peft_model(jlora.init_random(config), jlora.LoraConfig(r=2, lora_dropout=0.1),
                                                        rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="lora_dropout"):
        stack_layers(model)
