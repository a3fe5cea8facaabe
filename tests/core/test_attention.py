"""Attention backends: blockwise equals a float64 numpy attention (value and dq, dk, dv), the model's
logits on every backend equal transformers' (packing and a sliding window included), and LoRA gradients
through the whole model equal the reference path's."""
import numpy as np
import pytest
from flax import nnx

import jax
import jax.numpy as jnp
import jlora
from jlora.attention import BlockSizes, attend, blockwise_attention, check_backend, reference_attention, use_attention
from jlora.train.loss import token_loss_sum
from jlora.train.state import SplitModel

from tests.long_context.attention_float64 import numpy_attention

EPS32 = 2.0 ** -23


def _assert_packed_rows_equal_float64(attention, window, seed):
    """`attention(q, k, v, segment_ids)` on 23 positions, packed segments in both rows and padding (segment 0)
    in row 0, 2 kv heads x 3 queries each: value and dq, dk, dv in float32 against the float64 attention.
    Bound: float32 rounding over the head and key reductions."""
    b, t, kv, g, d = 2, 23, 2, 3, 8
    rng = np.random.RandomState(seed)
    q, k, v = rng.randn(b, t, kv, g, d), rng.randn(b, t, kv, d), rng.randn(b, t, kv, d)
    dout = rng.randn(b, t, kv, g, d)
    seg = np.array([[1] * 10 + [2] * 9 + [0] * 4, [3] * 12 + [4] * 11])  # some block pairs see nothing
    want, grads = numpy_attention(q, k, v, seg, window, 0.3, dout)
    out, vjp = jax.vjp(jax.jit(lambda q, k, v: attention(q, k, v, jnp.asarray(seg))),
                       *(jnp.asarray(a, jnp.float32) for a in (q, k, v)))
    got = vjp(jnp.asarray(dout, jnp.float32))
    bound = 16 * (d + t) * EPS32
    for name, x, ref in zip(["out", "dq", "dk", "dv"], [out, *got], [want, *grads]):
        assert x.dtype == jnp.float32, name
        assert np.abs(np.asarray(x, np.float64) - ref).max() <= bound * np.abs(ref).max(), name


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("blocks", [BlockSizes(4, 4), BlockSizes(8, 4), BlockSizes(3, 7), BlockSizes()])
def test_blockwise_equals_float64(window, blocks):
    """Rows padded to the blocks; block pairs between two segments are skipped."""
    _assert_packed_rows_equal_float64(
        lambda q, k, v, seg: blockwise_attention(q, k, v, seg, sliding_window=window, scale=0.3, block_sizes=blocks),
        window, seed=0)


@pytest.mark.parametrize("window", [None, 5])
def test_reference_equals_float64(window):
    """The reference backend's own backward (a custom_vjp, not autodiff)."""
    _assert_packed_rows_equal_float64(
        lambda q, k, v, seg: reference_attention(q, k, v, seg, sliding_window=window, scale=0.3), window, seed=3)


@pytest.mark.parametrize("backend", ["blockwise", "reference"])
def test_logit_softcap_equals_float64(backend):
    """Gemma 2's soft cap (cap 2 bends scores that reach ~5 here), a window and packed segments: value and
    dq, dk, dv against float64; blockwise differentiates through the cap in its own backward."""
    b, t, kv, g, d = 2, 19, 2, 2, 8
    rng = np.random.RandomState(2)
    q, k, v = 1.5 * rng.randn(b, t, kv, g, d), 1.5 * rng.randn(b, t, kv, d), rng.randn(b, t, kv, d)
    dout = rng.randn(b, t, kv, g, d)
    seg = np.array([[1] * 11 + [2] * 8, [5] * 19])
    want, grads = numpy_attention(q, k, v, seg, 6, 0.35, dout, cap=2.0)
    plain, _ = numpy_attention(q, k, v, seg, 6, 0.35, dout)
    assert np.abs(plain - want).max() > 0.1 * np.abs(want).max()  # the cap matters at these scores

    def f(q, k, v):
        return attend(q, k, v, jnp.asarray(seg), backend=backend, sliding_window=6, scale=0.35,
                      block_sizes=BlockSizes(4, 8), logit_softcap=2.0)

    out, vjp = jax.vjp(jax.jit(f), *(jnp.asarray(a, jnp.float32) for a in (q, k, v)))
    got = vjp(jnp.asarray(dout, jnp.float32))
    bound = 16 * (d + t) * EPS32
    for name, x, ref in zip(["out", "dq", "dk", "dv"], [out, *got], [want, *grads]):
        assert np.abs(np.asarray(x, np.float64) - ref).max() <= bound * np.abs(ref).max(), name
    with pytest.raises(ValueError, match="logit_softcap must be > 0"):
        attend(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), jnp.asarray(seg), backend=backend, scale=0.35,
               logit_softcap=0.0)


def test_bad_backend_names_the_available_ones():
    with pytest.raises(ValueError, match=r"'cudnn' is not available on cpu \(needs a CUDA GPU\); available here: "
                                         "auto, blockwise, reference, splash, flash"):
        check_backend("cudnn", "cpu")
    with pytest.raises(ValueError, match="'splash' is not available on gpu"):
        check_backend("splash", "gpu")
    with pytest.raises(ValueError, match="'xla' is not implemented yet"):
        check_backend("xla")
    with pytest.raises(ValueError, match=r"'flash' is not available on tpu \(needs a CUDA GPU"):
        check_backend("flash", "tpu")
    with pytest.raises(ValueError, match="'fast' is unknown"):
        check_backend("fast")


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_packed_logits_equal_transformers(family, checkpoint, hf_model, close32, logits32_and_64, packed_row):
    """Blockwise with 4-position blocks (several blocks per example, mistral's window 8 crossing blocks)
    and the reference path: each packed example's logits equal transformers' on it alone."""
    path = checkpoint(family)
    examples, row, seg, pos = packed_row(pad=3)
    ref = hf_model(path)
    wants = [logits32_and_64(ref, ex[None]) for ex in examples]
    for backend, blocks in (("blockwise", BlockSizes(4, 4)), ("reference", None)):
        model = use_attention(jlora.load_hf(path), backend, block_sizes=blocks)
        packed = np.asarray(model(row, positions=pos, segment_ids=seg))
        start = 0
        for ex, (want, want64) in zip(examples, wants):
            close32(packed[0, start:start + len(ex)], want[0], want64[0], what=f"{backend} example at {start}")
            start += len(ex)


@pytest.mark.parametrize("family", ["mistral", "llama-tied"])
def test_lora_grads_equal_reference_path(family, checkpoint):
    """LoRA gradients through the whole model (every layer's dq, dk, dv feed them): blockwise with 8-position
    blocks against the reference path, packed rows. Both are float32 computations of the same function;
    the bound is float32 rounding over the longest reduction (hidden 32, 31 positions, 2 layers)."""
    path = checkpoint(family)
    rng = np.random.RandomState(6)
    rows, t = 2, 31
    seg = np.sort(rng.randint(1, 4, (rows, t)), axis=1)
    batch = {"inputs": rng.randint(3, 96, (rows, t)), "targets": rng.randint(3, 96, (rows, t)),
             "loss_mask": (rng.rand(rows, t) > 0.2), "segment_ids": seg,
             "positions": np.stack([np.concatenate([np.arange(n) for n in np.unique(s, return_counts=True)[1]])
                                    for s in seg])}
    batch = {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}
    grads = {}
    for backend, blocks in (("blockwise", BlockSizes(8, 8)), ("reference", None)):
        model = jlora.get_peft_model(jlora.load_hf(path), jlora.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False),
                                     rngs=nnx.Rngs(3))
        use_attention(model, backend, block_sizes=blocks)
        split = SplitModel.of(model)
        grads[backend] = jax.jit(jax.grad(lambda p: token_loss_sum(split.model(p, split.frozen), batch)[0]))(
            split.params())
    bound = 64 * (32 + t) * EPS32
    for k, ref in grads["reference"].items():
        ref = np.asarray(ref, np.float64)
        assert np.abs(ref).max() > 0, k
        assert np.abs(np.asarray(grads["blockwise"][k], np.float64) - ref).max() <= bound * np.abs(ref).max(), k


def test_auto_is_reference_within_one_block():
    """auto on CPU: the materialized path while one block covers the row (same memory), blockwise beyond it;
    splash on TPU; cudnn on a GPU where it can express the call (bf16/fp16, no soft cap), else flash."""
    from jlora.attention.backends import resolve
    assert resolve("auto", 256, on="cpu") == "reference" and resolve("auto", 257, on="cpu") == "blockwise"
    assert resolve("auto", 64, BlockSizes(32, 64), on="cpu") == "blockwise"
    assert resolve("reference", 10_000) == "reference" and resolve("blockwise", 8) == "blockwise"
    assert resolve("auto", 8, on="tpu") == "splash" and resolve("auto", 100_000, on="tpu") == "splash"
    assert resolve("auto", 4096, dtype=jnp.bfloat16, head_dim=128, on="gpu") == "cudnn"
    assert resolve("auto", 4096, dtype=jnp.float32, head_dim=128, on="gpu") == "flash"
    assert resolve("auto", 4096, dtype=jnp.bfloat16, head_dim=128, logit_softcap=50.0, on="gpu") == "flash"


@pytest.mark.parametrize("backend", ["blockwise", "reference"])
def test_bfloat16_against_float64(backend):
    """bf16 operands (as a bf16 model runs): value and gradients within a few bf16 roundings (2^-8) of the
    float64 attention of the same bf16-rounded inputs; float32 accumulation inside."""
    b, t, kv, g, d = 2, 40, 2, 2, 16
    rng = np.random.RandomState(1)
    args = [jnp.asarray(a, jnp.bfloat16) for a in (rng.randn(b, t, kv, g, d), rng.randn(b, t, kv, d),
                                                   rng.randn(b, t, kv, d), rng.randn(b, t, kv, g, d))]
    seg = np.ones((b, t), np.int32)
    want, grads = numpy_attention(*(np.asarray(a, np.float64) for a in args[:3]), seg, 16, 0.25,
                                   np.asarray(args[3], np.float64))
    out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, jnp.asarray(seg), backend=backend, sliding_window=16,
                                              scale=0.25, block_sizes=BlockSizes(8, 8)), *args[:3])
    assert out.dtype == jnp.bfloat16
    for name, x, ref in zip(["out", "dq", "dk", "dv"], [out, *vjp(args[3])], [want, *grads]):
        assert x.dtype == jnp.bfloat16, name
        assert np.abs(np.asarray(x, np.float64) - ref).max() <= 8 * 2.0 ** -8 * np.abs(ref).max(), name
