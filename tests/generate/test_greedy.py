"""Greedy generation equals transformers' generate(do_sample=False) token for token (float32): left-padded
batches of different prompt lengths, per-row eos stops, Mistral's sliding window shorter than the output,
and a PEFT-saved adapter (PeftModel.generate as the reference)."""
import numpy as np
import peft
import pytest
import torch
from flax import nnx

import jlora
from jlora.generate.api import stop_ids
from jlora.generate.decode import generate_tokens

N = 20
LENGTHS = (5, 11, 3)


def _prompts(seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randint(3, 96, n).tolist() for n in LENGTHS]


def hf_greedy(model, prompts, max_new_tokens, eos):
    """transformers' greedy tokens per row (cut after its first eos), and the smallest top-2 logit gap seen."""
    p = max(map(len, prompts))
    ids = np.zeros((len(prompts), p), np.int64)
    mask = np.zeros_like(ids)
    for i, row in enumerate(prompts):
        ids[i, p - len(row):], mask[i, p - len(row):] = row, 1
    with torch.no_grad():
        out = model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=0, output_scores=True,
                             return_dict_in_generate=True)
    tokens, gap = [], np.inf
    scores = torch.stack(out.scores, 1).numpy()
    for row, seq in enumerate(out.sequences[:, p:].tolist()):
        stop = next((i + 1 for i, t in enumerate(seq) if eos is not None and t == eos), len(seq))
        tokens.append(seq[:stop])
        top2 = np.sort(scores[row, :stop], -1)[:, -2:]
        gap = min(gap, float((top2[:, 1] - top2[:, 0]).min()))
    return tokens, gap


def _check(got, want, gap, what):
    # A top-2 gap near float32 rounding would make the comparison a coin toss on some CPU: guard the setup.
    assert gap > 1e-5, f"{what}: transformers' top-2 logits differ by only {gap}; pick other prompts"
    assert [g.token_ids for g in got] == want, what
    stops = [g.finish_reason for g in got]
    assert "eos" in stops and "length" in stops, f"{what}: the test needs rows that stop early and rows that don't"


def _eos_for(tokens):
    """A token row 0 emits around step 5 and row 1 never does: per-row stopping gets exercised."""
    return next(t for t in tokens[0][4:] if t not in tokens[1])


@pytest.mark.parametrize("family", ["llama", "mistral", pytest.param("qwen2", marks=pytest.mark.slow)])
def test_greedy_equals_transformers(family, checkpoint, hf_model):
    path = checkpoint(family)
    ref, prompts = hf_model(path), _prompts()
    eos = _eos_for(hf_greedy(ref, prompts, N, None)[0])
    want, gap = hf_greedy(ref, prompts, N, eos)
    if family == "mistral":  # the window (8) is shorter than prompt + output: it must matter
        ref.config.sliding_window = None
        assert hf_greedy(ref, prompts, N, eos)[0] != want, "the sliding window makes no difference here"
    got = generate_tokens(jlora.load_hf(path), prompts, max_new_tokens=N, eos_token_ids=[eos])
    _check(got, want, gap, family)


@pytest.mark.parametrize("family", ["llama", pytest.param("mistral", marks=pytest.mark.slow),
                                    pytest.param("qwen2", marks=pytest.mark.slow)])
def test_greedy_with_peft_adapter_equals_peft(family, checkpoint, hf_model, tmp_path):
    path = checkpoint(family)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                             init_lora_weights=False, task_type="CAUSAL_LM")
    torch.manual_seed(3)
    trained = peft.get_peft_model(hf_model(path), config)
    with torch.no_grad():  # large enough to change the greedy path
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.mul_(20.0)
    trained.save_pretrained(tmp_path / "adapter")
    ref = peft.PeftModel.from_pretrained(hf_model(path), tmp_path / "adapter").eval()
    prompts = _prompts(1)
    eos = _eos_for(hf_greedy(ref, prompts, N, None)[0])
    want, gap = hf_greedy(ref, prompts, N, eos)
    base, _ = hf_greedy(hf_model(path), prompts, N, eos)
    assert base != want, "the adapter must change the greedy tokens, or this test proves nothing"
    model = jlora.load_adapter(jlora.load_hf(path), tmp_path / "adapter", rngs=nnx.Rngs(0))
    _check(generate_tokens(model, prompts, max_new_tokens=N, eos_token_ids=[eos]), want, gap, f"{family}+adapter")


def test_stop_ids_are_transformers_generation_config(checkpoint, hf_model):
    path = checkpoint("llama")
    eos, _ = stop_ids(jlora.load_hf(path))
    assert eos == [hf_model(path).generation_config.eos_token_id]


def test_prompt_longer_than_cache_names_both_lengths(checkpoint):
    model = jlora.load_hf(checkpoint("llama"))
    with pytest.raises(ValueError, match=r"prompt 1 has 40 tokens, longer than the cache \(max_len=32\)"):
        generate_tokens(model, [[5] * 3, [5] * 40], max_new_tokens=4, max_len=32)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 96\)"):
        generate_tokens(model, [[5, 96]], max_new_tokens=4)
