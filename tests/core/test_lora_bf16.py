"""A bf16 projection with float32 adapters computes what PEFT's `lora.Linear` computes in bf16 (issue 16 item 5).

PEFT (base model loaded in bf16, adapters autocast to float32): `base = x W^T` in bf16, then x is cast to
the adapters' dtype, `low = scaling * (x A^T) B^T` in float32, `y = bf16(float32(base) + low)`. jlora keeps
the rank-r path in the adapters' dtype too and rounds `base + low` once.

Tolerance, derived rather than fitted: each bf16 rounding is within 2^-8 of its value (8 significant
bits), PEFT rounds twice (base, y) and jlora once (y), so |y_jlora - y_peft| <= 2^-8 (|base| + |y_peft| +
|y_jlora|), plus float32 accumulation-order slack bounded by K * 2^-24 times the magnitude sum
|x| |W| + scaling |x| |A| |B|. Rank-r products computed in bf16 (A, B and x A rounded to bf16: the old
behaviour) miss this bound by an order of magnitude. The gradients of A and B are float32 products on
both sides: bounded by the accumulation slack alone.
"""
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx

from jlora.llama import DEFAULT_KERNELS
from jlora.llama import Linear
from jlora.lora_layer import LoRA

K, N, R, M, ALPHA = 96, 80, 8, 64, 16


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(K, N, bias=False)

    def forward(self, x):
        return self.proj(x)


def _peft(seed):
    torch.manual_seed(seed)
    model = peft.get_peft_model(_Net().to(torch.bfloat16), peft.LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=["proj"], init_lora_weights=False))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.5)  # a low-rank part as large as the frozen one
    assert layer.lora_A["default"].weight.dtype == torch.float32  # PEFT's autocast_adapter_dtype
    return model, layer


def _weights(layer):
    get = lambda t: t.detach().float().numpy()  # noqa: E731
    return get(layer.base_layer.weight), get(layer.lora_A["default"].weight), get(layer.lora_B["default"].weight)


def _jlora(w, a, b, impl):
    lin = Linear(K, N, use_bias=False, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, init_std=0.02,
                 rngs=nnx.Rngs(0))
    lin.kernel.set_value(jnp.asarray(w.T, jnp.bfloat16))
    lin.lora = LoRA(K, N, R, scaling=ALPHA / R, rngs=nnx.Rngs(0))
    lin.lora.a.set_value(jnp.asarray(a.T))
    lin.lora.b.set_value(jnp.asarray(b.T))
    lin.kernel_impl = impl
    return lin


@pytest.mark.parametrize("impl", [DEFAULT_KERNELS, "xla", None], ids=["default", "xla", "plain"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_forward_and_adapter_grads_match_peft(impl, seed):
    model, layer = _peft(seed)
    w, a, b = _weights(layer)
    rng = np.random.default_rng(seed)
    x_t = torch.from_numpy(rng.standard_normal((M, K)).astype(np.float32)).to(torch.bfloat16)
    dy_t = torch.from_numpy(rng.standard_normal((M, N)).astype(np.float32)).to(torch.bfloat16)
    y_t = model(x_t)
    (y_t.float() * dy_t.float()).sum().backward()
    want = y_t.detach().float().numpy().astype(np.float64)
    want_da = layer.lora_A["default"].weight.grad.numpy().T.astype(np.float64)
    want_db = layer.lora_B["default"].weight.grad.numpy().T.astype(np.float64)

    lin = _jlora(w, a, b, impl)
    x = jnp.asarray(x_t.float().numpy(), jnp.bfloat16)
    dy = jnp.asarray(dy_t.float().numpy(), jnp.bfloat16)
    graphdef, params, rest = nnx.split(lin, nnx.LoRAParam, ...)

    def loss(p):
        y = nnx.merge(graphdef, p, rest)(x)
        return jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32)), y

    (_, y), grads = jax.value_and_grad(loss, has_aux=True)(params)
    got = np.asarray(y, np.float64)
    assert y.dtype == jnp.bfloat16

    s = ALPHA / R
    x64, dy64 = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    base = x64 @ w.T.astype(np.float64)
    slack = K * 2.0 ** -24 * (np.abs(x64) @ np.abs(w.T) + s * (np.abs(x64) @ np.abs(a.T)) @ np.abs(b.T))
    bound = 2.0 ** -8 * (np.abs(base) + np.abs(want) + np.abs(got)) + slack
    assert np.all(np.abs(got - want) <= bound), np.max(np.abs(got - want) / bound)

    da, db = np.asarray(grads["lora"]["a"][...], np.float64), np.asarray(grads["lora"]["b"][...], np.float64)
    xa_mag = np.abs(x64) @ np.abs(a.T)
    da_mag = s * np.abs(x64).T @ (np.abs(dy64) @ np.abs(b))
    db_mag = s * xa_mag.T @ np.abs(dy64)
    assert np.all(np.abs(da - want_da) <= 2 * M * 2.0 ** -24 * da_mag + 1e-30)
    assert np.all(np.abs(db - want_db) <= 2 * (M + K) * 2.0 ** -24 * db_mag + 1e-30)


def test_bound_rejects_the_bf16_rank_r_path():
    """The bound above is tight enough to tell: A, B and x A rounded to bf16 (the old path) break it."""
    model, layer = _peft(0)
    w, a, b = _weights(layer)
    x_t = torch.from_numpy(np.random.default_rng(0).standard_normal((M, K)).astype(np.float32)).to(torch.bfloat16)
    with torch.no_grad():
        want = model(x_t).float().numpy().astype(np.float64)
    bf = lambda v: np.asarray(jnp.asarray(v, jnp.bfloat16), np.float64)  # noqa: E731
    x64 = x_t.float().numpy().astype(np.float64)
    base = x64 @ w.T.astype(np.float64)
    old = bf(base + (ALPHA / R) * bf(x64 @ bf(a.T)) @ bf(b.T))
    bound = 2.0 ** -8 * (np.abs(base) + np.abs(want) + np.abs(old))
    assert np.any(np.abs(old - want) > bound)
