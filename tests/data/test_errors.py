"""Every DataError names the file, the line and what was expected."""

import re

import pytest

from jlora.data import DataError, load_examples, read_jsonl, tokenize_records

GOOD = {"text": "fine"}


def _raises(path, tokenizer, match, seq_len=32):
    with pytest.raises(DataError, match=match) as info:
        load_examples(path, tokenizer, seq_len=seq_len)
    return str(info.value)


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


@pytest.mark.parametrize("bad, what", [
    ('{"text": "unterminated', "malformed JSON"),
    ('{"text": "a",}', "malformed JSON"),
    ("not json at all", "malformed JSON"),
    ('["a", "list"]', "expected a JSON object, found list"),
    ('"a string"', "expected a JSON object, found str"),
])
def test_malformed_line(write_jsonl, tokenizer, bad, what):
    path = write_jsonl([GOOD, GOOD, bad, GOOD])
    _raises(path, tokenizer, re.escape(f"{path}:3: {what}"))


def test_invalid_utf8(tmp_path, tokenizer):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    _raises(path, tokenizer, re.escape(f"{path}:2: not valid UTF-8"))


EXPECTED = '{"text"} or {"prompt", "completion"} or {"messages"}'


@pytest.mark.parametrize("row, found, problem", [
    ({"prompt": "p"}, '"prompt"', "missing fields"),
    ({"completion": "c", "id": 3}, '"completion", "id"', "missing fields"),
    ({}, "none", "missing fields"),
    ({"txt": "typo"}, '"txt"', "missing fields"),
    ({"text": "t", "prompt": "p", "completion": "c"}, '"text", "prompt", "completion"',
     "fields of several formats"),
])
def test_missing_or_ambiguous_fields(write_jsonl, tokenizer, row, found, problem):
    path = write_jsonl([GOOD, row])
    message = _raises(path, tokenizer, re.escape(f"{path}:2: {problem}"))
    assert EXPECTED in message and f"found fields {found}" in message


@pytest.mark.parametrize("row, what", [
    ({"text": 3}, 'field "text" must be a string, found int'),
    ({"prompt": "p", "completion": None}, 'field "completion" must be a string, found NoneType'),
    ({"messages": []}, 'field "messages" must be a non-empty list'),
    ({"messages": "hi"}, 'field "messages" must be a non-empty list'),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]},
     'messages[1] must be an object with string fields "role" and "content"'),
    ({"messages": ["hi"]}, "messages[0] must be an object"),
])
def test_wrong_field_types(write_jsonl, tokenizer, row, what):
    path = write_jsonl([GOOD, GOOD, GOOD, row])
    _raises(path, tokenizer, re.escape(f"{path}:4: {what}"))


def test_line_numbers_count_blank_lines(write_jsonl, tokenizer):
    path = write_jsonl([GOOD, "", "   ", {"prompt": "p"}])
    _raises(path, tokenizer, re.escape(f"{path}:4: missing fields"))


@pytest.mark.parametrize("rows", [[], [""], ["", "  "]])
def test_empty_file(write_jsonl, rows):
    path = write_jsonl(rows)
    with pytest.raises(DataError, match=re.escape(f"{path}: no examples")):
        read_jsonl(path)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=re.escape(f"{path}: cannot read data file")):
        read_jsonl(path)


def test_empty_record_list(tokenizer):
    with pytest.raises(DataError, match="no examples"):
        tokenize_records([], tokenizer, seq_len=8)


def test_nothing_to_train_on(write_jsonl, tokenizer):
    path = write_jsonl([{"prompt": "a long prompt " * 20, "completion": " x"},
                        {"messages": [{"role": "user", "content": "no reply"}]}])
    _raises(path, tokenizer, re.escape(f"{path}: none of the 2 examples has a token to train on"),
            seq_len=16)


def test_messages_without_chat_template(write_jsonl, tokenizer):
    plain = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    path = write_jsonl([GOOD, {"messages": [{"role": "user", "content": "a"}]}])
    _raises(path, plain, re.escape(f'{path}:2: the "messages" format needs a chat template'))


def test_assistant_first(write_jsonl, tokenizer):
    path = write_jsonl([{"messages": [{"role": "assistant", "content": "hi"}]}])
    _raises(path, tokenizer, re.escape(f"{path}:1: messages[0] is an assistant message"))


def test_template_failure_names_the_line(write_jsonl, tokenizer):
    strict = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('no system role') }}{% endif %}{{ m['content'] }}{% endfor %}")
    path = write_jsonl([GOOD, {"messages": [{"role": "system", "content": "s"},
                                            {"role": "user", "content": "u"}]}])
    _raises(path, strict, re.escape(f"{path}:2: the chat template failed") + ".*no system role")


def test_prefix_unstable_template(write_jsonl, tokenizer):
    # Renders a reply differently once another turn follows it (like templates that
    # strip the reasoning of earlier turns): the reply's tokens cannot be located.
    unstable = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    unstable.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>"
        "{% if m['role'] == 'assistant' and not loop.last %}(earlier){% else %}{{ m['content'] }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    path = write_jsonl([GOOD, GOOD, {"messages": messages}])
    _raises(path, unstable, re.escape(f"{path}:3: cannot locate the tokens of messages[1]"))
