"""The Triton kernels under Triton's interpreter (TRITON_INTERPRET=1, torch CPU tensors).

Three layers, each against the jnp references:

* ``lora_matmul_kernel`` and ``nf4_matmul_kernel`` launched directly on torch
  tensors, forward and dx orientation, with shapes that leave ragged row,
  column and contraction tiles (every mask is exercised);
* the JAX wiring (``impl="triton"``: jax-triton's ``triton_call`` arguments,
  strides, grid, output shape) through a stand-in ``jax_triton`` that runs the
  same kernel in the interpreter inside ``jax.pure_callback``, with jax.vjp
  gradients (jax-triton itself imports only with a CUDA build of jax).

Triton 3.9's interpreter multiplies bfloat16 dot operands as their raw uint16
bits (``InterpreterBuilder.create_dot`` converts only 8-bit floats), so
bfloat16 results come out as garbage; the ``bf16_dot`` fixture widens bfloat16
operands to float32 there (exact: bf16 products are exact in fp32, the GPU
accumulates in fp32 too). Skipped when triton or torch is not installed.
"""

import os
import re
import sys
import types

os.environ["TRITON_INTERPRET"] = "1"  # before triton.jit decorates the kernels

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
triton = pytest.importorskip("triton")

from jlora import kernels  # noqa: E402
from jlora import nf4  # noqa: E402
from jlora.kernels import BlockSizes  # noqa: E402
from jlora.kernels import dispatch  # noqa: E402
from jlora.kernels import triton_lora  # noqa: E402
from jlora.kernels import triton_nf4  # noqa: E402
from jlora.nf4.dequantize import absmax_f32  # noqa: E402

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
SCALE = 2.0


@pytest.fixture(autouse=True)
def bf16_dot(monkeypatch):
    from triton.runtime import interpreter  # pylint: disable=import-outside-toplevel
    import triton.language as tl  # pylint: disable=import-outside-toplevel
    create_dot = interpreter.InterpreterBuilder.create_dot

    def widen(handle):
        if handle.dtype == tl.bfloat16:
            bits = handle.data.astype(np.uint32) << 16
            return interpreter.TensorHandle(bits.view(np.float32), tl.float32)
        return handle

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot",
                        lambda self, a, b, *rest: create_dot(self, widen(a), widen(b),
                                                             *rest))


def to_torch(a):
    a = np.array(a)  # a writable host copy
    if a.dtype == jnp.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def to_numpy(t):
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(jnp.bfloat16)
    return t.numpy()


def torch_dtype(dtype):
    return {jnp.dtype(jnp.float32): torch.float32,
            jnp.dtype(jnp.bfloat16): torch.bfloat16}[jnp.dtype(dtype)]


def assert_close(got, want, dtype, what):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, what
    err = np.abs(got - want).max()
    bound = TOL[dtype] * max(1.0, np.abs(want).max())
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def inputs(m, k, n, r, dtype, seed=0):
    kx, kw, ka, kb, kd = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(kx, (m, k)).astype(dtype)
    w = (jax.random.normal(kw, (k, n)) / np.sqrt(k)).astype(dtype)
    a = jax.random.normal(ka, (k, r)) / np.sqrt(k)
    b = jax.random.normal(kb, (r, n)) / np.sqrt(r)
    dy = jax.random.normal(kd, (m, n)).astype(dtype)
    return x, w, a, b, dy


def launch(kernel, grid_cols, m, args, meta, out_cols, dtype, block_m=16, block_n=32):
    out = torch.empty((m, out_cols), dtype=torch_dtype(dtype))
    kernel[(triton.cdiv(m, block_m), triton.cdiv(grid_cols, block_n))](
        *args[0], *out.stride(), out, BLOCK_M=block_m, BLOCK_N=block_n, **meta)
    return to_numpy(out)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_lora_kernel(dtype):
    # M = 40 (ragged against 16), K = 96 / N = 80 (ragged against 32), r = 40
    # (three epilogue steps of BLOCK_R = 16, the last one ragged).
    m, k, n, r = 40, 96, 80, 40
    x, w, a, b, dy = inputs(m, k, n, r, dtype)
    y_ref, vjp = jax.vjp(lambda x: kernels.lora_linear_reference(x, w, a, b, scale=SCALE),
                         x)
    (dx_ref,) = vjp(dy)
    xa = (SCALE * jnp.dot(x, a.astype(dtype), preferred_element_type=jnp.float32)
          ).astype(dtype)
    g = (SCALE * jnp.dot(dy, b.astype(dtype).T, preferred_element_type=jnp.float32)
         ).astype(dtype)
    meta = dict(BLOCK_C=32, BLOCK_R=16, PRECISION=triton_lora.precision(dtype))
    X, W, XA, B, DY, G, A = map(to_torch, (x, w, xa, b.astype(dtype), dy, g,
                                           a.astype(dtype)))
    y = launch(triton_lora.lora_matmul_kernel, n, m,
               [(X, W, XA, B, m, n, k, r, *X.stride(), *W.stride(), *XA.stride(),
                 *B.stride())], meta, n, dtype)
    assert_close(y, y_ref, dtype, "y")
    # dx = dy @ w.T + g @ a.T: the same kernel on transposed views.
    WT, AT = W.t(), A.t()
    dx = launch(triton_lora.lora_matmul_kernel, k, m,
                [(DY, WT, G, AT, m, k, n, r, *DY.stride(), *WT.stride(), *G.stride(),
                  *AT.stride())], meta, k, dtype)
    assert_close(dx, dx_ref, dtype, "dx")


@pytest.mark.parametrize("dtype,blocksize,double_quant", [
    (jnp.float32, 64, True), (jnp.bfloat16, 32, False)], ids=["f32-bs64-dq", "bf16-bs32"])
def test_nf4_kernel(dtype, blocksize, double_quant):
    m, k, n, r = 40, 96, 80, 8  # K = 96 is not a multiple of 64: blocks cross rows
    x, _, a, b, dy = inputs(m, k, n, r, dtype)
    q = nf4.quantize(jax.random.normal(jax.random.key(3), (n, k)) / np.sqrt(k),
                     blocksize=blocksize, double_quant=double_quant)
    y_ref, vjp = jax.vjp(lambda x: kernels.nf4_lora_linear_reference(
        x, q, a, b, scale=SCALE), x)
    (dx_ref,) = vjp(dy)
    xa = (SCALE * jnp.dot(x, a.astype(dtype), preferred_element_type=jnp.float32)
          ).astype(dtype)
    g = (SCALE * jnp.dot(dy, b.astype(dtype).T, preferred_element_type=jnp.float32)
         ).astype(dtype)
    X, XA, B, DY, G, AT = map(to_torch, (x, xa, b.astype(dtype), dy, g,
                                         a.astype(dtype).T))
    codes, absmax = to_torch(q.codes), to_torch(absmax_f32(q))
    table = torch.from_numpy(triton_nf4.code_table_numpy())
    meta = dict(BLOCKSIZE=blocksize, BLOCK_C=32, BLOCK_R=16,
                PRECISION=triton_lora.precision(dtype))
    y = launch(triton_nf4.nf4_matmul_kernel, n, m,
               [(X, codes, absmax, table, XA, B, m, n, k, r, k, *X.stride(),
                 *XA.stride(), *B.stride())], dict(meta, TRANSPOSE_W=False), n, dtype)
    assert_close(y, y_ref, dtype, "y")
    dx = launch(triton_nf4.nf4_matmul_kernel, k, m,
                [(DY, codes, absmax, table, G, AT, m, k, n, r, k, *DY.stride(),
                  *G.stride(), *AT.stride())], dict(meta, TRANSPOSE_W=True), k, dtype)
    assert_close(dx, dx_ref, dtype, "dx")


def _fake_triton_call(*args, kernel, out_shape, grid, name="", num_warps=None,
                      num_stages=None, **meta):
    """jax_triton.triton_call, run by Triton's interpreter on the host."""
    del name, num_warps, num_stages
    is_scalar = lambda v: isinstance(v, (bool, int, float))  # noqa: E731
    arrays = [v for v in args if not is_scalar(v)]

    def host(*host_arrays):
        it = iter(host_arrays)
        targs = [v if is_scalar(v) else to_torch(next(it)) for v in args]
        out = torch.empty(out_shape.shape, dtype=torch_dtype(out_shape.dtype))
        kernel[grid](*targs, out, **meta)
        return to_numpy(out)

    return jax.pure_callback(host, out_shape, *arrays)


@pytest.fixture
def fake_jax_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "jax_triton",
                        types.SimpleNamespace(triton_call=_fake_triton_call))
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)


@pytest.mark.usefixtures("fake_jax_triton")
def test_impl_triton_through_jax():
    m, k, n, r, dtype = 24, 64, 48, 4, jnp.bfloat16
    x, w, a, b, dy = inputs(m, k, n, r, dtype)
    q = nf4.quantize(w.T.astype(jnp.float32), blocksize=32)
    tiles = BlockSizes(16, 32, 16, 16, 32, 16)
    for fused, ref, weight in (
            (kernels.lora_linear, kernels.lora_linear_reference, w),
            (kernels.nf4_lora_linear, kernels.nf4_lora_linear_reference, q)):
        got_fn = lambda x, a, b: fused(x, weight, a, b, scale=SCALE, impl="triton",  # noqa: E731
                                       block_sizes=tiles)
        ref_fn = lambda x, a, b: ref(x, weight, a, b, scale=SCALE)  # noqa: E731
        y, vjp = jax.vjp(jax.jit(got_fn), x, a, b)
        y_ref, vjp_ref = jax.vjp(ref_fn, x, a, b)
        name = fused.__name__
        assert_close(y, y_ref, dtype, f"{name} y")
        for what, got, want in zip(("dx", "da", "db"), vjp(dy), vjp_ref(dy)):
            assert_close(got, want, dtype, f"{name} {what}")


@pytest.mark.usefixtures("fake_jax_triton")
def test_triton_tiles_are_checked():
    x, w, a, b, _ = inputs(8, 64, 48, 4, jnp.float32)
    with pytest.raises(ValueError, match=re.escape(
            "impl='triton' needs power-of-two tiles >= 16, got block_sizes.block_k=24")):
        kernels.lora_linear(x, w, a, b, scale=1.0, impl="triton",
                            block_sizes=BlockSizes(16, 32, 24, 16, 32, 16))
