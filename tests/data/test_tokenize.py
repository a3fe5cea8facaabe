"""Token ids and loss masks per format, against the tokenizer called directly."""

import numpy as np
import pytest

from jlora.data import Record, tokenize_record


def _record(data):
    return Record(data, "mem.jsonl", 1)


def _encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_text_trains_on_everything_after_bos(tokenizer):
    example = tokenize_record(_record({"text": "The capital of Peru is Lima."}), tokenizer)
    expected = ([tokenizer.bos_token_id] + _encode(tokenizer, "The capital of Peru is Lima.")
                + [tokenizer.eos_token_id])
    assert example.tokens.tolist() == expected
    assert example.tokens.dtype == np.int32
    assert example.mask[1:].all()


def test_bos_and_eos_not_doubled(tokenizer):
    example = tokenize_record(_record({"text": "<s>hello</s>"}), tokenizer)
    assert example.tokens.tolist() == ([tokenizer.bos_token_id] + _encode(tokenizer, "hello")
                                       + [tokenizer.eos_token_id])


@pytest.mark.parametrize("prompt, completion", [
    ("Q: What is the capital of France?\nA:", " The capital of France is Paris."),
    ("Q: Reverse the words: cat sun red.\nA:", " red sun cat."),
    ("no space at the end", "and none at the start"),
    ("", "empty prompt"),
    ("empty completion", ""),
])
def test_prompt_completion_mask_is_exactly_the_completion(tokenizer, prompt, completion):
    example = tokenize_record(_record({"prompt": prompt, "completion": completion}), tokenizer)
    p, c = _encode(tokenizer, prompt), _encode(tokenizer, completion)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert example.tokens.tolist() == [bos] + p + c + [eos]
    assert example.mask.tolist() == [False] * (1 + len(p)) + [True] * (len(c) + 1)


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of Chile?"},
     {"role": "assistant", "content": "Santiago."}],
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": "What is 2 plus 2?"},
     {"role": "assistant", "content": "4."},
     {"role": "user", "content": "And 3 plus 3?"},
     {"role": "assistant", "content": "6."}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""},
     {"role": "user", "content": "trailing user turn"}],
    [{"role": "user", "content": "two replies"}, {"role": "assistant", "content": "one"},
     {"role": "assistant", "content": "two"}],
]

# A ChatML-like template, with the {% generation %} markers transformers uses for
# `return_assistant_tokens_mask`; jlora.data is given the same template without them.
CHATML = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + '\n' }}"
    "{% if m['role'] == 'assistant' %}"
    "{% generation %}{{ m['content'] + '</s>' }}{% endgeneration %}"
    "{% else %}{{ m['content'] + '</s>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


def _strip_generation(template):
    for tag in ("{% generation %}", "{% endgeneration %}"):
        template = template.replace(tag, "")
    return template


@pytest.mark.parametrize("template", ["default", "chatml"])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_messages_mask_matches_transformers_assistant_mask(tokenizer, template, messages):
    """Prefix rendering finds the tokens transformers marks via {% generation %}."""
    reference = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    if template == "chatml":
        reference.chat_template = CHATML
    assert "{% generation %}" in reference.chat_template
    expected = reference.apply_chat_template(messages, return_dict=True,
                                             return_assistant_tokens_mask=True)
    plain = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = _strip_generation(reference.chat_template)

    example = tokenize_record(_record({"messages": messages}), plain)

    ids = list(expected["input_ids"])
    mask = list(expected["assistant_masks"])
    if ids[0] != tokenizer.bos_token_id:  # the ChatML template writes no BOS
        ids, mask = [tokenizer.bos_token_id] + ids, [0] + mask
    assert example.tokens.tolist() == ids
    assert example.mask.astype(int).tolist() == mask


def test_messages_reply_ends_with_eos_and_excludes_header(tokenizer):
    messages = CONVERSATIONS[0]
    example = tokenize_record(_record({"messages": messages}), tokenizer)
    trained = example.tokens[example.mask].tolist()
    assert trained == _encode(tokenizer, "Santiago.") + [tokenizer.eos_token_id]
    assert tokenizer.convert_tokens_to_ids("<|assistant|>") not in trained
