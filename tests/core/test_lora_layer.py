"""The LoRA layer's init, scaling and dropout follow PEFT's definitions."""
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlora


def test_default_init_is_kaiming_uniform_and_zero_b():
    lora = jlora.LoRA(256, 64, 32, scaling=1.0, rngs=nnx.Rngs(0))
    a, b = np.asarray(lora.a[...]), np.asarray(lora.b[...])
    bound = 1 / math.sqrt(256)
    assert a.shape == (256, 32) and b.shape == (32, 64)
    assert a.dtype == np.float32 and np.abs(a).max() <= bound
    assert abs(a.std() - bound / math.sqrt(3)) < 0.05 * bound  # std of U(-c, c) is c/sqrt(3)
    assert (b == 0).all()


def test_gaussian_init_has_std_one_over_r():
    lora = jlora.LoRA(512, 64, 16, scaling=1.0, init_weights="gaussian", rngs=nnx.Rngs(0))
    assert abs(np.asarray(lora.a[...]).std() - 1 / 16) < 0.05 / 16
    assert (np.asarray(lora.b[...]) == 0).all()


def test_false_init_makes_b_random():
    lora = jlora.LoRA(64, 64, 16, scaling=1.0, init_weights=False, rngs=nnx.Rngs(0))
    b = np.asarray(lora.b[...])
    assert np.abs(b).max() <= 1 / math.sqrt(16) and b.std() > 0.1


def test_rslora_scaling():
    assert jlora.LoraConfig(r=64, lora_alpha=16, use_rslora=True).scaling_for("x.q_proj") == 16 / 8
    assert jlora.LoraConfig(r=64, lora_alpha=16).scaling_for("x.q_proj") == 16 / 64


def test_pattern_first_match_wins_and_needs_a_component_boundary():
    cfg = jlora.LoraConfig(r=8, rank_pattern={"q_proj": 2, "layers.0.self_attn.q_proj": 4, "proj": 6})
    assert cfg.rank_for("model.layers.0.self_attn.q_proj") == 2
    assert cfg.rank_for("model.layers.0.self_attn.k_proj") == 8  # "proj" must follow a "." boundary
    assert cfg.rank_for("model.layers.0.mlp.proj") == 6


def test_target_presets():
    assert jlora.LoraConfig(target_modules="qv").target_modules == ["q_proj", "v_proj"]
    assert len(jlora.LoraConfig(target_modules="all-linear").target_modules) == 7
    assert jlora.LoraConfig().target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"]


def test_dropout_only_in_training():
    lora = jlora.LoRA(32, 32, 4, scaling=1.0, dropout=0.5, init_weights=False, rngs=nnx.Rngs(0))
    x = jnp.ones((4, 32))
    assert np.array_equal(lora(x), lora(x))  # built in eval mode
    lora.train()
    assert not np.array_equal(lora(x), lora(x))
    lora.eval()
    np.testing.assert_allclose(lora(x), (x @ lora.a[...]) @ lora.b[...], rtol=1e-6)


def test_bad_init_value():
    with pytest.raises(ValueError, match="init_lora_weights"):
        jlora.LoraConfig(init_lora_weights="pissa")
