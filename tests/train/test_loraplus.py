"""LoRA+ (make_optimizer(loraplus_lr_ratio=k)): PEFT's create_loraplus_optimizer groups and torch's AdamW
are the references."""
import jax
import numpy as np
import optax
import peft
from peft.optimizers import create_loraplus_optimizer
import pytest
import torch
from flax import nnx

import jlora
from jlora.train.optimizer import make_optimizer
from jlora.train.state import SplitModel

LR, RATIO, WD = 1e-3, 16.0, 0.1


def _peft_name(name: str) -> str:
    """jlora flat name (model.layers.0.self_attn.q_proj.lora.a) -> PEFT parameter name."""
    module, _, ab = name.rpartition(".lora.")
    return f"base_model.model.{module}.lora_{ab.upper()}.default.weight"


@pytest.fixture(scope="module")
def models(checkpoint):
    """(jlora's flat adapter params, the PEFT model) for the same LoRA on the same tiny Llama."""
    import transformers
    path = checkpoint("llama")
    targets = ["q_proj", "v_proj", "down_proj"]
    ours = jlora.get_peft_model(jlora.load_hf(path), jlora.LoraConfig(r=4, lora_alpha=8, target_modules=targets),
                                rngs=nnx.Rngs(0))
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ref = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    return SplitModel.of(ours).params(), ref


def _peft_lrs(ref):
    opt = create_loraplus_optimizer(ref, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO,
                                                    loraplus_weight_decay=WD)
    ids = {id(p): n for n, p in ref.named_parameters()}
    return opt, {ids[id(p)]: (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}


def test_learning_rates_are_peft_groups(models):
    """The lr each parameter moves with (read off the first AdamW update, where update = -lr * g / (|g| + eps))
    equals the lr of its group in PEFT's optimizer."""
    params, ref = models
    _, want = _peft_lrs(ref)
    assert sorted(_peft_name(n) for n in params) == sorted(want), "the same adapters on both sides"
    assert {lr for lr, _ in want.values()} == {LR, LR * RATIO}, "PEFT has both groups here"
    tx = make_optimizer(optax.constant_schedule(LR), max_grad_norm=None, loraplus_lr_ratio=RATIO)
    rng = np.random.RandomState(0)
    grads = {n: np.where(rng.rand(*p.shape) < 0.5, -1.0, 1.0).astype(np.float32) for n, p in params.items()}
    zeros = {n: np.zeros(p.shape, np.float32) for n, p in params.items()}
    updates, _ = jax.jit(tx.update)(grads, tx.init(zeros), zeros)
    for name, u in updates.items():
        # float32 bias corrections (1 - b1, 1 - b2) leave ~1e-5; the groups differ by the ratio (16x).
        got = -np.asarray(u, np.float64) * (1 + 1e-8) / grads[name]
        np.testing.assert_allclose(got, want[_peft_name(name)][0], rtol=1e-4, err_msg=name)


def test_one_step_equals_torch_adamw(models):
    """Two AdamW steps with clipping and weight decay: jlora float32 vs torch's AdamW (PEFT's groups) in float64."""
    import copy
    params, ref = models
    ref = copy.deepcopy(ref).double()
    opt64, _ = _peft_lrs(ref)
    rng = np.random.RandomState(1)
    start = {n: rng.randn(*p.shape).astype(np.float32) for n, p in params.items()}
    grads = [{n: (rng.randn(*p.shape) * 0.3).astype(np.float32) for n, p in params.items()} for _ in range(2)]
    named = dict(ref.named_parameters())
    with torch.no_grad():
        for n, v in start.items():
            named[_peft_name(n)].copy_(torch.tensor(v.T, dtype=torch.float64))  # jlora [in, r] / [r, out]
    for g in grads:
        for n, v in g.items():
            named[_peft_name(n)].grad = torch.tensor(v.T, dtype=torch.float64)
        torch.nn.utils.clip_grad_norm_([named[_peft_name(n)] for n in g], 1.0)
        opt64.step()

    tx = make_optimizer(optax.constant_schedule(LR), weight_decay=WD, max_grad_norm=1.0, loraplus_lr_ratio=RATIO)
    p = {n: np.asarray(v) for n, v in start.items()}
    state = tx.init(p)
    update = jax.jit(tx.update)
    for g in grads:
        updates, state = update(g, state, p)
        p = optax.apply_updates(p, updates)
    for n, v in p.items():
        want = named[_peft_name(n)].detach().numpy().T
        moved = np.abs(want - start[n]).max()
        assert moved > 0.5 * LR * (RATIO if n.endswith(".b") else 1), "the step must move every group"
        # float32 storage: the error is a few ulps of |p| per step, far below a group's lr difference.
        np.testing.assert_allclose(np.asarray(v, np.float64), want, rtol=0, atol=8 * 2 ** -23 * np.abs(want).max()
                                   + 1e-3 * moved, err_msg=n)


def test_ratio_must_be_positive():
    with pytest.raises(ValueError, match="loraplus_lr_ratio"):
        make_optimizer(optax.constant_schedule(LR), loraplus_lr_ratio=0.0)
