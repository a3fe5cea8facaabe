"""TPU splash attention (jlora.attention.splash) in Pallas interpret mode on CPU: value and dq, dk, dv equal a
float64 numpy attention (causal, packed segments, padding, a sliding window, grouped kv heads, soft cap),
and the model's logits with backend "splash" equal transformers' on packed rows with a window."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
import jlora
from jlora.attention import BlockSizes, attend, use_attention

from tests.long_context.attention_float64 import numpy_attention
from tests.numerics import packed_row_matches_examples

EPS32 = 2.0 ** -23


@pytest.mark.parametrize("t, window, cap, blocks, dtype", [
    (23, None, None, None, jnp.bfloat16),                 # one 128 block, padded from 23; bf16 as a TPU runs it
    (150, 40, 2.0, BlockSizes(128, 128), jnp.float32),    # two blocks (padded to 256), window across them, soft cap
])
def test_splash_equals_float64(t, window, cap, blocks, dtype):
    """Row 0 packs two examples and ends in padding (segment 0); row 1 is one example. 2 kv heads x 2
    queries each. float32 bound: float32 rounding over the head and key reductions, as for blockwise; bf16:
    a few bf16 roundings (2^-8) of the float64 attention of the same bf16-rounded inputs."""
    b, kv, g, d = 2, 2, 2, 8
    rng = np.random.RandomState(3)
    args = [jnp.asarray(a, dtype) for a in (1.5 * rng.randn(b, t, kv, g, d), 1.5 * rng.randn(b, t, kv, d),
                                            rng.randn(b, t, kv, d), rng.randn(b, t, kv, g, d))]
    cut = [t // 2, t - t // 2 - 3, 3]
    seg = np.array([[1] * cut[0] + [2] * cut[1] + [0] * cut[2], [7] * t])
    q64, k64, v64, dout64 = (np.asarray(a, np.float64) for a in args)
    want, grads = numpy_attention(q64, k64, v64, seg, window, 0.3, dout64, cap)

    def f(q, k, v):
        return attend(q, k, v, jnp.asarray(seg), backend="splash", sliding_window=window, scale=0.3,
                      logit_softcap=cap, block_sizes=blocks)

    out, vjp = jax.vjp(jax.jit(f), *args[:3])
    got = vjp(args[3])
    bound = 16 * (d + t) * EPS32 if dtype == jnp.float32 else 8 * 2.0 ** -8
    for name, x, ref in zip(["out", "dq", "dk", "dv"], [out, *got], [want, *grads]):
        assert x.dtype == dtype, name
        assert np.abs(np.asarray(x, np.float64) - ref).max() <= bound * np.abs(ref).max(), name


def test_splash_blocks_must_be_lane_multiples():
    x = jnp.zeros((1, 8, 1, 1, 8))
    with pytest.raises(ValueError, match="block_q=64 must be a multiple of 128"):
        attend(x, x[:, :, :, 0], x[:, :, :, 0], jnp.ones((1, 8), jnp.int32), backend="splash", scale=1.0,
               block_sizes=BlockSizes(64, 128))


@pytest.mark.slow  # ~22 s on the shared 2-core box: the interpret-mode kernel traced per layer
def test_packed_logits_equal_transformers(checkpoint, hf_model, packed_row):
    """Mistral (window 8) with backend "splash": each packed example's logits equal transformers' on it alone."""
    path = checkpoint("mistral")
    examples, row, seg, pos = packed_row(pad=3)
    ref = hf_model(path)
    model = use_attention(jlora.load_hf(path), "splash")
    packed_row_matches_examples(model, ref, examples, row, pos, seg, what="splash")


@pytest.mark.slow  # ~40 s: interpret-mode kernels traced through the whole model's forward and backward
def test_lora_grads_equal_reference_path(checkpoint):
    """LoRA gradients through the whole model (every layer's dq, dk, dv feed them), mistral (window 8) on
    packed rows: splash against the reference path. Bound as in tests/core/test_attention.py."""
    from flax import nnx
    from jlora.train.loss import token_loss_sum
    from jlora.train.state import SplitModel

    path = checkpoint("mistral")
    rng = np.random.RandomState(6)
    rows, t = 2, 31
    seg = np.sort(rng.randint(1, 4, (rows, t)), axis=1)
    batch = {"inputs": rng.randint(3, 96, (rows, t)), "targets": rng.randint(3, 96, (rows, t)),
             "loss_mask": (rng.rand(rows, t) > 0.2), "segment_ids": seg,
             "positions": np.stack([np.concatenate([np.arange(n) for n in np.unique(s, return_counts=True)[1]])
                                    for s in seg])}
    batch = {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}
    grads = {}
    for backend in ("splash", "reference"):
        model = jlora.get_peft_model(jlora.load_hf(path), jlora.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False),
                                     rngs=nnx.Rngs(3))
        use_attention(model, backend)
        split = SplitModel.of(model)
        grads[backend] = jax.jit(jax.grad(lambda p: token_loss_sum(split.model(p, split.frozen), batch)[0]))(
            split.params())
    bound = 64 * (32 + t) * EPS32
    for k, ref in grads["reference"].items():
        ref = np.asarray(ref, np.float64)
        assert np.abs(ref).max() > 0, k
        assert np.abs(np.asarray(grads["splash"][k], np.float64) - ref).max() <= bound * np.abs(ref).max(), k


@pytest.mark.parametrize("window", [None, 129, 255, 300])  # 129, 255: block-edge boundaries
def test_block_classified_masks_give_splash_own_mask_info(window):
    """jlora's masks answer wholly visible/hidden blocks without evaluating them (a speedup of splash's
    numpy mask processing): the forward, dq and dkv MaskInfo must equal those splash builds from its own
    CausalMask / LocalMask((window - 1, 0)), at 8 x 8 blocks with a window that crosses blocks."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
    from jlora.attention import splash

    t, heads = 1024, 4
    blocks = splash.splash_block_sizes(t, BlockSizes(128, 128))
    one = sa.CausalMask((t, t)) if window is None else sa.LocalMask((t, t), (window - 1, 0), 0)
    theirs = sa.make_splash_mha(sa.MultiHeadMask([one] * heads), block_sizes=blocks, head_shards=1, q_seq_shards=1)
    ours = splash._kernel(heads, t, window, None, blocks, False)
    for phase in ("fwd_mask_info", "dq_mask_info", "dkv_mask_info"):
        for field, a, b in zip(getattr(theirs, phase)._fields, getattr(theirs, phase), getattr(ours, phase)):
            assert (a is None) == (b is None), (phase, field)
            if a is not None:
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{phase}.{field}")


@pytest.mark.slow  # ~30 s: three interpret-mode layers
def test_gemma2_packed_logits_equal_transformers(tmp_path, hf_model, close32, logits32_and_64, packed_row):
    """Gemma 2 with backend "splash": attention soft cap 2 (bends these scores), sliding window 6 on layers 0
    and 2 and full attention on layer 1 (per-layer windows), packed rows: each example equals transformers
    on it alone."""
    import torch
    import transformers

    config = transformers.Gemma2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=16, num_hidden_layers=3, sliding_window=6,
                                       query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                                       final_logit_softcapping=3.0, max_position_embeddings=256)
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if name.endswith("norm.weight") else 0.25))
    ref.save_pretrained(tmp_path, safe_serialization=True)
    examples, row, seg, pos = packed_row(pad=4)
    model = use_attention(jlora.load_hf(tmp_path), "splash")
    from flax import nnx
    graph, state = nnx.split(model)
    packed = np.asarray(jax.jit(lambda s, *a: nnx.merge(graph, s)(*a))(state, row, pos, seg))
    ref, start = hf_model(tmp_path), 0
    for ex in examples:
        want, want64 = logits32_and_64(ref, ex[None])
        close32(packed[0, start:start + len(ex)], want[0], want64[0], what=f"gemma2 splash example at {start}")
        start += len(ex)
