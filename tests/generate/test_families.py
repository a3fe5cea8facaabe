"""Greedy generation equals transformers' for the other families (slow: one compilation each): Gemma 2 (soft
caps, sandwich norms, alternating windows), Gemma 3 (q/k norms, local/global rope tables), Qwen3 (q/k norms,
a sliding layer), Phi-3 (fused projections, window) and SmolLM3 (layers without rope)."""
import pytest
import torch
import transformers

import jlora
from jlora.generate.decode import generate_tokens
from tests.generate.test_greedy import _prompts, hf_greedy

N = 16
BASE = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=256)
CONFIGS = {
    "gemma2": ("Gemma2Config", dict(num_hidden_layers=3, sliding_window=6, query_pre_attn_scalar=24,
                                    attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    "gemma3": ("Gemma3TextConfig", dict(num_hidden_layers=4, sliding_window=6, query_pre_attn_scalar=24,
                                        final_logit_softcapping=3.0, layer_types=[
                                            "sliding_attention", "sliding_attention", "full_attention",
                                            "sliding_attention"],
                                        rope_parameters={"full_attention": dict(rope_type="linear", factor=4.0,
                                                                                rope_theta=50000.0),
                                                         "sliding_attention": dict(rope_type="default",
                                                                                   rope_theta=1000.0)})),
    "qwen3": ("Qwen3Config", dict(num_hidden_layers=2, use_sliding_window=True, sliding_window=6,
                                  max_window_layers=1)),
    "phi3": ("Phi3Config", dict(num_hidden_layers=2, sliding_window=8, head_dim=None, pad_token_id=0)),
    "smollm3": ("SmolLM3Config", dict(num_hidden_layers=4, no_rope_layer_interval=2, pad_token_id=0)),
}


def _build(family, out_dir):
    cls_name, extra = CONFIGS[family]
    kw = {k: v for k, v in {**BASE, **extra}.items() if v is not None}
    config = getattr(transformers, cls_name)(**kw)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # weights large enough for the soft caps and windows to matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randn_like(p) * 0.1 + (0.0 if family.startswith("gemma") else 1.0))
            elif p.ndim > 1:
                p.copy_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out_dir)
    return out_dir


@pytest.mark.slow
@pytest.mark.parametrize("family", list(CONFIGS))
def test_greedy_equals_transformers(family, tmp_path, hf_model):
    path = _build(family, tmp_path / family)
    ref, prompts = hf_model(path), _prompts()
    want, gap = hf_greedy(ref, prompts, N, None)
    assert gap > 1e-5, f"{family}: transformers' top-2 logits differ by only {gap}"
    got = generate_tokens(jlora.load_hf(path), prompts, max_new_tokens=N)
    assert [g.token_ids for g in got] == want, family
