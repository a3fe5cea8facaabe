"""Assistant-only loss masks under the real chat templates of Qwen3, Qwen2.5, Gemma 2/3, Phi-3, Phi-4 and SmolLM3.

The templates are the published jinja texts, stored under tests/data/templates/ (SOURCES.md says where each
comes from). Each is written into a tiny local tokenizer (trained here with the `tokenizers` library, the
family's special tokens added as the checkpoints add them). The reference is independent of jlora.data: the
conversation is rendered with transformers' `apply_chat_template` and the replies are cut out of the rendered
string by the family's known markers (from the end of the assistant header to the end of the end-of-turn
token). The tokens jlora.data trains on, decoded run by run, must equal those strings.

What the loss covers (jlora.data.tokenize's contract, checked here): a reply's text and the end-of-turn token
the model must emit (`<|im_end|>`, `<end_of_turn>`, `<|end|>`), never the role header, the user's text, the
newline after the end-of-turn token or Phi-3's conversation-final EOS. Qwen3 (default `enable_thinking`):
the `<think>...</think>` block the template writes after the header is trained, empty or not, as TRL's
`{% generation %}` template (trl/chat_templates/qwen3_training.jinja) and Unsloth's
`train_on_responses_only(response_part="<|im_start|>assistant\\n")` do; replies before the last user turn are
trained as the template renders them there, without their reasoning. With `enable_thinking=False` (Qwen3) or
`/no_think` (SmolLM3) the empty think block belongs to the generation prompt and is not trained.
"""

import pathlib
import re

import pytest
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from jlora.data import DataError, Record, tokenize_record

TEMPLATES = pathlib.Path(__file__).parent / "templates"

# family -> (assistant header, end-of-turn marker, tokenizer layout, bos, eos, special tokens, plain added tokens)
FAMILIES = {
    "qwen3": ("<|im_start|>assistant\n", "<|im_end|>", "bytelevel", None, "<|im_end|>",
              ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], ["<think>", "</think>", "<tool_call>", "</tool_call>"]),
    "qwen2_5": ("<|im_start|>assistant\n", "<|im_end|>", "bytelevel", None, "<|im_end|>",
                ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], ["<tool_call>", "</tool_call>"]),
    "smollm3": ("<|im_start|>assistant\n", "<|im_end|>", "bytelevel", None, "<|im_end|>",
                ["<|im_start|>", "<|im_end|>"], ["<think>", "</think>"]),
    "gemma2": ("<start_of_turn>model\n", "<end_of_turn>", "sentencepiece", "<bos>", "<eos>",
               ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"], []),
    "gemma3": ("<start_of_turn>model\n", "<end_of_turn>", "sentencepiece", "<bos>", "<eos>",
               ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"], []),
    "phi3": ("<|assistant|>\n", "<|end|>", "sentencepiece", "<s>", "<|endoftext|>",
             ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], []),
    "phi4": ("<|im_start|>assistant<|im_sep|>", "<|im_end|>", "bytelevel", "<|endoftext|>", "<|im_end|>",
             ["<|endoftext|>", "<|im_start|>", "<|im_sep|>", "<|im_end|>"], []),
}

CORPUS = [
    "What is the capital of Chile? Santiago is the capital of Chile.",
    "Answer briefly. What is 2 plus 2? 4. And 3 plus 3? 6.",
    "Let me think: the user wants a sum, so I add the numbers. The answer is 11.",
    "You are a helpful assistant named SmolLM, trained by Hugging Face. Knowledge Cutoff Date: June 2025",
    "Reasoning Mode: /think /no_think ## Metadata ## Custom Instructions Today Date",
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "get_weather {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Lima\"}} sunny, 24 C",
]


def _build(family: str):
    header, eot, layout, bos, eos, special, plain = FAMILIES[family]
    if layout == "bytelevel":  # Qwen, Phi-4, SmolLM3: byte-level BPE
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False, special_tokens=special,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:  # Gemma, Phi-3: SentencePiece-style BPE with byte fallback, "\u2581" for spaces
        tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
        tok.normalizer = normalizers.Replace(" ", "\u2581")
        tok.pre_tokenizer = pre_tokenizers.Split("\n", "isolated")
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
        trainer = trainers.BpeTrainer(vocab_size=420, show_progress=False,
                                      special_tokens=special + [f"<0x{b:02X}>" for b in range(256)])
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos,
        unk_token="<unk>" if "<unk>" in special else None, clean_up_tokenization_spaces=False)
    tokenizer.chat_template = (TEMPLATES / f"{family}.jinja").read_text()
    assert tokenizer.is_fast
    return tokenizer


@pytest.fixture(scope="module")
def family_tokenizer():
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = _build(family)
        return cache[family]
    return get


def _record(data, line=1):
    return Record(data, "chat.jsonl", line)


def _reference_spans(text: str, family: str, prompt_suffix: str = "") -> list[str]:
    """The replies cut out of the rendered conversation by the family's markers."""
    header, eot = FAMILIES[family][:2]
    spans, pos = [], 0
    while (h := text.find(header, pos)) >= 0:
        start = h + len(header)
        end = text.find(eot, start)
        if end < 0:  # a header with no reply after it (Phi-4 writes one after every user turn)
            break
        if prompt_suffix and text.startswith(prompt_suffix, start):
            start += len(prompt_suffix)
        spans.append(text[start:end + len(eot)])
        pos = end + len(eot)
    return spans


def _trained_runs(tokenizer, example) -> list[str]:
    runs, run = [], []
    for token, trained in zip(example.tokens.tolist(), example.mask.tolist()):
        if trained:
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    if run:
        runs.append(run)
    return [tokenizer.decode(r, skip_special_tokens=False) for r in runs]


SINGLE = [{"role": "user", "content": "What is the capital of Chile?"},
          {"role": "assistant", "content": "Santiago is the capital of Chile."}]
MULTI = [{"role": "user", "content": "What is 2 plus 2?"},
         {"role": "assistant", "content": "4."},
         {"role": "user", "content": "And 3 plus 3?"},
         {"role": "assistant", "content": "6."}]
SYSTEM = [{"role": "system", "content": "Answer briefly."}] + MULTI
TRAILING_USER = MULTI + [{"role": "user", "content": "Thanks!"}]
# Gemma trims contents: the marks jlora.data wraps contents in then change the rendering (its fallback path).
PADDED = [{"role": "user", "content": "  What is 2 plus 2?\n"},
          {"role": "assistant", "content": "\n 4. "},
          {"role": "user", "content": "And 3 plus 3? "},
          {"role": "assistant", "content": " 6.\n\n"}]
CONVERSATIONS = {"single": SINGLE, "multi": MULTI, "system": SYSTEM, "trailing_user": TRAILING_USER, "padded": PADDED}


def _check(tokenizer, family, messages, prompt_suffix="", **template_kwargs):
    data = {"messages": messages}
    if template_kwargs:
        data["chat_template_kwargs"] = template_kwargs
    example = tokenize_record(_record(data), tokenizer)
    text = tokenizer.apply_chat_template(messages, tokenize=False, **template_kwargs)
    expected = _reference_spans(text, family, prompt_suffix)
    assert len(expected) == sum(m["role"] == "assistant" for m in messages)
    assert _trained_runs(tokenizer, example) == expected
    # the trained tokens are the tokenization of the rendered text (after a BOS the template may not write)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert example.tokens.tolist()[-len(ids):] == ids
    return example, text


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_mask_is_exactly_the_replies(family_tokenizer, family, conversation):
    messages = CONVERSATIONS[conversation]
    tokenizer = family_tokenizer(family)
    if family == "gemma2" and messages[0]["role"] == "system":
        pytest.skip("Gemma 2's template refuses a system turn (test_gemma2_system_turn_is_a_clear_error)")
    example, text = _check(tokenizer, family, messages)
    trained = "".join(_trained_runs(tokenizer, example))
    for message in messages:
        if message["role"] != "assistant":
            assert message["content"] not in trained
    assert FAMILIES[family][0].strip() not in trained  # the role header
    if family == "gemma3" and conversation == "system":  # the system turn is folded into the first user turn
        assert "<start_of_turn>user\nAnswer briefly.\n\nWhat is 2 plus 2?" in text
    if family in ("gemma2", "gemma3"):
        assert "<start_of_turn>model\n" in text and "<start_of_turn>assistant" not in text


def test_phi3_final_eos_is_not_trained(family_tokenizer):
    tokenizer = family_tokenizer("phi3")
    example, text = _check(tokenizer, "phi3", SINGLE)
    assert text.endswith("<|end|>\n<|endoftext|>")
    assert example.tokens[-1] == tokenizer.convert_tokens_to_ids("<|endoftext|>") and not example.mask[-1]


QWEN3_THINKING = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2 plus 2?"},
    {"role": "assistant", "content": "4.", "reasoning_content": "The user wants a sum: 2 plus 2 is 4."},
    {"role": "user", "content": "And 5 plus 6?"},
    {"role": "assistant", "content": "<think>\nLet me think: 5 plus 6 is 11.\n</think>\n\nThe answer is 11."},
]


def test_qwen3_default_trains_the_think_block(family_tokenizer):
    tokenizer = family_tokenizer("qwen3")
    example, text = _check(tokenizer, "qwen3", SINGLE)
    assert _trained_runs(tokenizer, example) == ["<think>\n\n</think>\n\nSantiago is the capital of Chile.<|im_end|>"]


def test_qwen3_reasoning_of_earlier_turns_is_stripped(family_tokenizer):
    tokenizer = family_tokenizer("qwen3")
    example, text = _check(tokenizer, "qwen3", QWEN3_THINKING)
    assert "2 plus 2 is 4" not in text  # the template drops the earlier turn's reasoning
    assert _trained_runs(tokenizer, example) == [
        "4.<|im_end|>", "<think>\nLet me think: 5 plus 6 is 11.\n</think>\n\nThe answer is 11.<|im_end|>"]


def test_qwen3_reasoning_content_of_the_last_turn_is_trained(family_tokenizer):
    tokenizer = family_tokenizer("qwen3")
    messages = QWEN3_THINKING[:3]
    example, _ = _check(tokenizer, "qwen3", messages)
    assert _trained_runs(tokenizer, example) == [
        "<think>\nThe user wants a sum: 2 plus 2 is 4.\n</think>\n\n4.<|im_end|>"]


@pytest.mark.parametrize("messages", [SINGLE, MULTI, TRAILING_USER], ids=["single", "multi", "trailing_user"])
def test_qwen3_without_thinking_leaves_the_empty_block_in_the_prompt(family_tokenizer, messages):
    tokenizer = family_tokenizer("qwen3")
    example, text = _check(tokenizer, "qwen3", messages, prompt_suffix="<think>\n\n</think>\n\n",
                           enable_thinking=False)
    assert all(not run.startswith("<think>") for run in _trained_runs(tokenizer, example))


def test_qwen3_tool_calls_are_trained(family_tokenizer):
    tokenizer = family_tokenizer("qwen3")
    messages = [{"role": "user", "content": "Weather in Lima?"},
                {"role": "assistant", "content": "",
                 "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                                  "arguments": {"city": "Lima"}}}]},
                {"role": "tool", "content": "sunny, 24 C"},
                {"role": "assistant", "content": "It is sunny."}]
    example, text = _check(tokenizer, "qwen3", messages)
    runs = _trained_runs(tokenizer, example)
    assert runs[0] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima"}}\n</tool_call><|im_end|>'
    assert "sunny, 24 C" not in "".join(runs)


@pytest.mark.parametrize("thinking", [True, False])
def test_smollm3_reasoning_modes(family_tokenizer, thinking):
    tokenizer = family_tokenizer("smollm3")
    suffix = "" if thinking else "<think>\n\n</think>\n"
    example, text = _check(tokenizer, "smollm3", SYSTEM, prompt_suffix=suffix, enable_thinking=thinking)
    assert ("Reasoning Mode: /think" if thinking else "Reasoning Mode: /no_think") in text
    assert _trained_runs(tokenizer, example) == ["4.<|im_end|>", "6.<|im_end|>"]


def test_chat_template_kwargs_argument_and_record_field(family_tokenizer):
    tokenizer = family_tokenizer("qwen3")
    by_argument = tokenize_record(_record({"messages": SINGLE}), tokenizer,
                                  chat_template_kwargs={"enable_thinking": False})
    by_field = tokenize_record(_record({"messages": SINGLE, "chat_template_kwargs": {"enable_thinking": False}}),
                               tokenizer)
    field_wins = tokenize_record(_record({"messages": SINGLE, "chat_template_kwargs": {"enable_thinking": False}}),
                                 tokenizer, chat_template_kwargs={"enable_thinking": True})
    assert by_argument.tokens.tolist() == by_field.tokens.tolist() == field_wins.tokens.tolist()
    assert _trained_runs(tokenizer, by_field) == ["Santiago is the capital of Chile.<|im_end|>"]
    with pytest.raises(DataError, match=re.escape('chat.jsonl:1: field "chat_template_kwargs" must be an object')):
        tokenize_record(_record({"messages": SINGLE, "chat_template_kwargs": ["enable_thinking"]}), tokenizer)


# Bad input: a clear error naming the row.

def test_gemma2_system_turn_is_a_clear_error(family_tokenizer):
    with pytest.raises(DataError, match=re.escape("chat.jsonl:7: the chat template failed") + ".*System role"):
        tokenize_record(_record({"messages": SYSTEM}, line=7), family_tokenizer("gemma2"))


def _with_template(tokenizer, template):
    other = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer,
                                                 eos_token=tokenizer.eos_token)
    other.chat_template = template
    return other


def test_template_that_drops_a_reply(family_tokenizer):
    # Phi-3's template, changed to write only the last assistant message.
    phi3 = (TEMPLATES / "phi3.jinja").read_text().replace(
        "{% elif message['role'] == 'assistant' %}", "{% elif message['role'] == 'assistant' and loop.last %}")
    tokenizer = _with_template(family_tokenizer("phi3"), phi3)
    with pytest.raises(DataError, match=re.escape("chat.jsonl:4: cannot locate the tokens of messages[1]")
                       + ".*does not render its content"):
        tokenize_record(_record({"messages": MULTI}, line=4), tokenizer)


def test_template_that_renders_out_of_order(family_tokenizer):
    # ChatML that writes the conversation backwards.
    backwards = ("{% for m in messages | reverse %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
                 "'<|im_end|>\\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    tokenizer = _with_template(family_tokenizer("qwen2_5"), backwards)
    with pytest.raises(DataError, match=re.escape("chat.jsonl:9: the chat template renders messages[1] (assistant) "
                                                  "before messages[0] (user)")):
        tokenize_record(_record({"messages": MULTI}, line=9), tokenizer)


def test_qwen3_reasoning_under_enable_thinking_false_is_a_clear_error(family_tokenizer):
    # The prompt ends in an empty think block, the reply brings its own reasoning: no split is right.
    data = {"messages": QWEN3_THINKING[:3], "chat_template_kwargs": {"enable_thinking": False}}
    with pytest.raises(DataError, match=re.escape("chat.jsonl:5: cannot locate the tokens of messages[2]: as the last "
                                                  "message it does not continue the generation prompt")):
        tokenize_record(_record(data, line=5), family_tokenizer("qwen3"))


@pytest.mark.parametrize("thinking", [True, False])
def test_smollm3_against_its_own_generation_tags(family_tokenizer, thinking):
    """SmolLM3's template ships {% generation %} tags around the whole assistant turn; transformers' assistant
    mask from them is a second reference: it must hold every trained token, and differ only by the header, the
    newline after <|im_end|> and (under /no_think) the empty think block of the generation prompt."""
    tokenizer = family_tokenizer("smollm3")
    example = tokenize_record(_record({"messages": SYSTEM, "chat_template_kwargs": {"enable_thinking": thinking}}),
                              tokenizer)
    reference = tokenizer.apply_chat_template(SYSTEM, return_dict=True, return_assistant_tokens_mask=True,
                                              enable_thinking=thinking)
    assert example.tokens.tolist() == list(reference["input_ids"])
    generated = [bool(m) for m in reference["assistant_masks"]]
    trained = example.mask.tolist()
    assert all(g for g, t in zip(generated, trained) if t)
    extra = tokenizer.decode([i for i, g, t in zip(example.tokens.tolist(), generated, trained) if g and not t])
    header = "<|im_start|>assistant\n" + ("" if thinking else "<think>\n\n</think>\n")
    assert extra == (header + "\n") * 2
