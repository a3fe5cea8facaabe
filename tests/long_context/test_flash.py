"""Pallas GPU flash attention (jlora.attention.flash) in Pallas interpret mode on CPU: value and dq, dk, dv equal
the float64 numpy attention with packed segments, padding, a sliding window, a soft cap and grouped kv heads;
on a CUDA GPU (skipped elsewhere) the Triton-lowered kernels are checked the same way. "auto" picks flash on a
GPU for what cuDNN cannot express."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jlora.attention import BlockSizes, attend
from jlora.attention.backends import available_backends, resolve
from jlora.attention.flash import flash_block

from tests.long_context.attention_float64 import numpy_attention
from tests.numerics import packed_row_matches_examples

EPS32 = 2.0 ** -23
gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU (Pallas Triton lowering)")


def _check(t, window, cap, blocks, dtype, d=8):
    """Row 0 packs two examples and ends in padding (segment 0); row 1 is one example; 2 kv heads x 3 queries.
    float32: float32 rounding over the head and key reductions; bf16: a few bf16 roundings (2^-8) of the
    float64 attention of the same bf16-rounded inputs."""
    b, kv, g = 2, 2, 3
    rng = np.random.RandomState(5)
    args = [jnp.asarray(a, dtype) for a in (1.5 * rng.randn(b, t, kv, g, d), 1.5 * rng.randn(b, t, kv, d),
                                            rng.randn(b, t, kv, d), rng.randn(b, t, kv, g, d))]
    cut = [t // 2, t - t // 2 - 3, 3]
    seg = np.array([[1] * cut[0] + [2] * cut[1] + [0] * cut[2], [7] * t])
    want, grads = numpy_attention(*(np.asarray(a, np.float64) for a in args[:3]), seg, window, 0.3,
                                  np.asarray(args[3], np.float64), cap)

    def f(q, k, v):
        return attend(q, k, v, jnp.asarray(seg), backend="flash", sliding_window=window, scale=0.3,
                      logit_softcap=cap, block_sizes=blocks)

    out, vjp = jax.vjp(jax.jit(f), *args[:3])
    bound = 16 * (d + t) * EPS32 if dtype == jnp.float32 else 8 * 2.0 ** -8
    for name, x, ref in zip(["out", "dq", "dk", "dv"], [out, *vjp(args[3])], [want, *grads]):
        assert x.dtype == dtype and x.shape == ref.shape, name
        assert np.abs(ref).max() > 0, name
        err = np.abs(np.asarray(x, np.float64) - ref).max()
        assert err <= bound * np.abs(ref).max(), (name, err, bound * np.abs(ref).max())


@pytest.mark.parametrize("t, window, cap, blocks, dtype", [
    (23, None, None, None, jnp.bfloat16),              # one block (32, padded from 23), bf16
    (70, 20, 2.0, BlockSizes(16, 16), jnp.float32),   # 5 blocks (padded to 80), window across blocks, soft cap
])
def test_flash_equals_float64(t, window, cap, blocks, dtype):
    _check(t, window, cap, blocks, dtype)


def test_head_dim_padded_to_a_power_of_two():
    """head_dim 12 (padded to 16 inside, as Phi-3's 96 would be to 128)."""
    _check(40, None, None, BlockSizes(16, 16), jnp.float32, d=12)


def test_blocks_must_be_equal_powers_of_two():
    assert flash_block(23) == 32 and flash_block(1000) == 64 and flash_block(5) == 16
    with pytest.raises(ValueError, match="power of two >= 16, got 24"):
        flash_block(100, BlockSizes(24, 24))
    with pytest.raises(ValueError, match="must be equal, got q=16, k=32"):
        flash_block(100, BlockSizes(16, 32))


def test_auto_uses_flash_on_gpu_where_cudnn_cannot():
    assert "flash" in available_backends("gpu") and "flash" in available_backends("cpu")
    assert "flash" not in available_backends("tpu")
    assert resolve("auto", 4096, dtype=jnp.bfloat16, head_dim=128, on="gpu") == "cudnn"
    assert resolve("auto", 4096, dtype=jnp.bfloat16, head_dim=128, logit_softcap=50.0, on="gpu") == "flash"
    assert resolve("auto", 4096, dtype=jnp.float32, head_dim=128, on="gpu") == "flash"


@gpu
@pytest.mark.parametrize("window, cap", [(None, None), (100, 30.0)])
def test_flash_equals_float64_on_gpu(window, cap):
    """The Triton-lowered kernels (attend picks them on a GPU), bf16, head_dim 64, T 256 (4 blocks of 64)."""
    _check(256, window, cap, None, jnp.bfloat16, d=64)


@pytest.mark.slow  # the interpret-mode kernels traced through every layer of a model
def test_packed_logits_equal_transformers(checkpoint, hf_model, packed_row):
    """Mistral (window 8) with backend "flash": each packed example's logits equal transformers' on it alone."""
    import jlora
    from jlora.attention import use_attention

    path = checkpoint("mistral")
    examples, row, seg, pos = packed_row(pad=3)
    ref = hf_model(path)
    model = use_attention(jlora.load_hf(path), "flash", block_sizes=BlockSizes(16, 16))
    packed_row_matches_examples(model, ref, examples, row, pos, seg, what="flash")


def test_kernels_lower_to_triton_for_cuda():
    """The GPU path (interpret=False) lowers for CUDA on this CPU host: the forward, dkv and dq kernels become
    Triton calls (Pallas -> Triton IR; compiling that IR to PTX and running it needs a GPU). A padded row that
    is not a power of two (330 -> 384) and head_dim 96 (padded to 128) included."""
    from jlora.attention.flash import flash_attention

    b, t, kv, g, d = 2, 330, 2, 2, 96
    q, k = jax.ShapeDtypeStruct((b, t, kv, g, d), jnp.bfloat16), jax.ShapeDtypeStruct((b, t, kv, d), jnp.bfloat16)

    def step(q, k, v, seg, dout):
        f = lambda q, k, v: flash_attention(q, k, v, seg, scale=0.1, sliding_window=100, logit_softcap=30.0,
                                            interpret=False)
        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp(dout)

    seg = jax.ShapeDtypeStruct((b, t), jnp.int32)
    text = jax.jit(step).trace(q, k, k, seg, q).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3
