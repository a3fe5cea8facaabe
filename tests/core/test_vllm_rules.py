"""Our encoding of vLLM's adapter rules (REFERENCE section 2) accepts good adapters and names each violation."""
import pytest

from jlora.vllm_rules import smallest_max_lora_rank, vllm_violations

GOOD = {"r": 16, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "bias": "none", "use_dora": False,
        "modules_to_save": None, "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {}}
KEYS = ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]


def test_good_adapter_passes():
    assert vllm_violations(GOOD, KEYS, 16) == []


@pytest.mark.parametrize("change,expect", [
    ({"use_dora": True}, "DoRA"),
    ({"bias": "all"}, "bias"),
    ({"lora_bias": True}, "lora_bias"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"init_lora_weights": "pissa_niter_4"}, "pissa"),
    ({"target_modules": None}, "target_modules"),
    ({"r": 64}, "--max-lora-rank 64"),
    ({"rank_pattern": {"q_proj": 100}}, "--max-lora-rank 128"),
])
def test_each_rule(change, expect):
    problems = vllm_violations({**GOOD, **change}, KEYS, 16)
    assert len(problems) == 1 and expect in problems[0]


@pytest.mark.parametrize("key,expect", [
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", "unsupported LoRA weight"),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", "unsupported LoRA weight"),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", "unsupported LoRA weight"),
    ("base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight", "qkv_proj"),
])
def test_bad_keys(key, expect):
    problems = vllm_violations(GOOD, [key], 16)
    assert len(problems) == 1 and expect in problems[0]


def test_max_lora_rank_values():
    assert [smallest_max_lora_rank(r) for r in (1, 2, 9, 16, 300, 512, 513)] == [1, 8, 16, 16, 320, 512, None]
    assert "not one vLLM accepts" in vllm_violations(GOOD, KEYS, 24)[0]
