"""jlora.generate(model, tokenizer, prompts): tokenization, chat templates, stop ids and text against
transformers on the embedded default base; sampling settings through the whole loop; bad input."""
import pytest
import torch
import transformers

import jlora
from jlora.generate.decode import fit_prompts

N = 8


@pytest.fixture(scope="module")
def base(default_base):
    return jlora.load_hf(default_base), transformers.AutoTokenizer.from_pretrained(default_base), default_base


def _hf_greedy_text(path, tok, ids_list):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    for ids in ids_list:  # one row at a time: no padding question on the reference side
        with torch.no_grad():
            seq = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 do_sample=False, max_new_tokens=N)[0, len(ids):]
        out.append(tok.decode(seq, skip_special_tokens=True))
    return out


def test_text_and_chat_equal_transformers(base):
    model, tok, path = base
    assert callable(jlora.generate) and jlora.generate.SamplingConfig is jlora.generate.sampler.SamplingConfig
    pieces = {}
    texts = jlora.generate(model, tok, ["What is LoRA?", "Tell me a story"], max_new_tokens=N,
                           stream=lambda row, piece: pieces.setdefault(row, []).append(piece))
    plain_ids = [tok("What is LoRA?")["input_ids"], tok("Tell me a story")["input_ids"]]
    assert [t.prompt_ids for t in texts] == plain_ids
    conversations = [[{"role": "user", "content": "What is LoRA?"}],  # the same shapes: no new compilation
                     [{"role": "user", "content": "Hi"}]]
    chat = jlora.generate(model, tok, conversations, chat=True, max_new_tokens=N)
    for conversation, answer in zip(conversations, chat):
        want = tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True)
        assert answer.prompt_ids == list(want["input_ids"])
    assert list(texts) + list(chat) == _hf_greedy_text(path, tok, plain_ids + [c.prompt_ids for c in chat])
    assert ["".join(pieces[r]) for r in range(2)] == list(texts), "the streamed pieces must add up to the text"
    assert all(isinstance(t, str) and t.finish_reason in ("eos", "length") for t in texts)


def test_sampling_through_the_loop(base):
    model, tok, _ = base
    prompts = ["What is LoRA?", "Hi"]
    hot = dict(max_new_tokens=N, temperature=1.5, top_p=0.95)  # (top_k=1 == greedy: test_sampler.py)
    a, b = (jlora.generate(model, tok, prompts, seed=1, **hot) for _ in range(2))
    c = jlora.generate(model, tok, prompts, seed=2, **hot)
    assert [t.token_ids for t in a] == [t.token_ids for t in b], "a fixed seed must reproduce the samples"
    assert [t.token_ids for t in a] != [t.token_ids for t in c], "another seed must sample differently"


def test_bad_input_is_named(base):
    model, tok, path = base
    bare = transformers.AutoTokenizer.from_pretrained(path)
    bare.chat_template = None
    with pytest.raises(ValueError, match=f"tokenizer of {path}.* has none"):
        jlora.generate(model, bare, ["hi"], chat=True)
    with pytest.raises(ValueError, match="top_p must be in \\(0, 1\\]"):
        jlora.generate(model, tok, ["hi"], top_p=0.0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        jlora.generate(model, tok, ["hi"], temperature=-1.0)
    with pytest.raises(ValueError, match="conversations need chat=True"):
        jlora.generate(model, tok, [[{"role": "user", "content": "hi"}]])
    with pytest.raises(ValueError, match=r"longer than the cache \(max_len=4\)"):
        jlora.generate(model, tok, ["a much longer prompt than four tokens"], max_len=4)


def test_truncation_keeps_the_last_tokens():
    prompts, bucket, max_len = fit_prompts([list(range(30)), [7, 8]], 8, 32, truncate=True)
    assert prompts == [list(range(5, 30)), [7, 8]] and (bucket, max_len) == (32, 32)  # 25 + 8 - 1 = 32 slots
    assert fit_prompts([[1] * 70], 8, None, truncate=False)[1:] == (128, 192)  # bucket 128, 128 + 7 -> 192
