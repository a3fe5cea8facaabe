"""Turning one record into token ids and the mask of tokens the loss trains on.

* text: every token is trained on.
* prompt/completion: prompt and completion are tokenized separately and concatenated,
  exactly as generation sees them (the prompt alone, then the model's continuation);
  only completion tokens are trained on.
* messages: rendered with the tokenizer's chat template. The tokens of assistant message
  ``i`` are found by rendering prefixes of the conversation: they start where
  ``messages[:i]`` rendered with the generation prompt ends and stop where
  ``messages[:i + 1]`` ends, so the assistant header is not trained on and the template's
  end-of-turn token is; whitespace the template writes after that token (ChatML's and
  Gemma's "\\n") is left out, as generation stops before it. This needs no
  ``{% generation %}`` markers and works for any template whose rendering of a prefix
  tokenizes to a prefix of the whole conversation (Llama, Mistral, Gemma, ChatML, ...);
  that is checked for every reply, so a template that rewrites earlier turns raises
  DataError rather than training on the wrong tokens.

BOS is prepended when the tokenizer has one and the tokens don't already start with it.
EOS is appended to text and completions (unless already there); for messages the
template's own end-of-turn tokens end each reply.
"""

from typing import NamedTuple

import numpy as np

from jlora.data.errors import DataError
from jlora.data.formats import record_format
from jlora.data.jsonl import Record


class Example(NamedTuple):
    """A tokenized record: ``tokens`` int32 [L]; ``mask`` bool [L], True on trained tokens.

    The model reads ``tokens[:-1]`` and predicts ``tokens[1:]``; the loss counts the
    prediction of ``tokens[t]`` where ``mask[t]``.
    """

    tokens: np.ndarray
    mask: np.ndarray


def tokenize_record(record: Record, tokenizer) -> Example:
    """Tokenizes a record with a transformers tokenizer (see the module docstring)."""
    kind = record_format(record)
    data = record.data
    if kind == "text":
        ids = _encode(tokenizer, data["text"])
        mask = [True] * len(ids)
        ids, mask = _append_eos(tokenizer, ids, mask)
    elif kind == "prompt_completion":
        prompt = _encode(tokenizer, data["prompt"])
        completion = _encode(tokenizer, data["completion"])
        ids = prompt + completion
        mask = [False] * len(prompt) + [True] * len(completion)
        ids, mask = _append_eos(tokenizer, ids, mask)
    else:
        ids, mask = _chat(tokenizer, record)
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids, mask = [bos] + ids, [False] + mask
    return Example(np.asarray(ids, np.int32).reshape(-1), np.asarray(mask, bool).reshape(-1))


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _append_eos(tokenizer, ids, mask):
    eos = tokenizer.eos_token_id
    if eos is None or (ids and ids[-1] == eos):
        return ids, mask
    return ids + [eos], mask + [True]


def _chat(tokenizer, record: Record):
    messages = record.data["messages"]
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f'{record.where}: the "messages" format needs a chat template, '
                        "and the tokenizer has none")

    def encode_prefix(n: int, add_generation_prompt: bool) -> list[int]:
        try:
            text = tokenizer.apply_chat_template(
                messages[:n], tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as e:  # jinja errors such as "roles must alternate"
            raise DataError(
                f"{record.where}: the chat template failed on messages[:{n}]: {e}") from e
        return _encode(tokenizer, text)

    def prefix_length(ids, prefix, i, what):
        if ids[:len(prefix)] != prefix:
            raise DataError(
                f"{record.where}: cannot locate the tokens of messages[{i}]: the chat template "
                f"rendering of {what} does not tokenize to a prefix of the whole conversation")
        return len(prefix)

    ids = encode_prefix(len(messages), add_generation_prompt=False)
    mask = [False] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise DataError(f"{record.where}: messages[0] is an assistant message; a reply "
                            "needs a message before it")
        start = prefix_length(ids, encode_prefix(i, True), i, f"messages[:{i}] + generation prompt")
        end = prefix_length(ids, encode_prefix(i + 1, False), i, f"messages[:{i + 1}]")
        end = _drop_trailing_separator(tokenizer, ids, start, end)
        mask[start:end] = [True] * (end - start)
    return ids, mask


def _drop_trailing_separator(tokenizer, ids, start, end):
    """Moves ``end`` back to just after the span's last special token if only whitespace follows."""
    special = set(tokenizer.all_special_ids)
    special.update(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)
    last = end
    while last > start and ids[last - 1] not in special:
        last -= 1
    if start < last < end and not tokenizer.decode(ids[last:end]).strip():
        return last
    return end
