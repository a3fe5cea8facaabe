"""Turning one record into token ids and the mask of tokens the loss trains on.

Every record is tokenized as ONE text, so the model trains on exactly the token sequence the
tokenizer gives the whole text. Which tokens are trained is decided by character offsets
(a fast tokenizer's ``offset_mapping``): a token is trained when its span reaches into the
trained characters. Tokenizing the pieces separately and concatenating would be wrong for
SentencePiece-style tokenizers (Llama 2, Mistral, Gemma): each piece gets its own leading
"\u2581", so "A:" + "Paris" would train on "\u2581A : \u2581Paris" while the tokenizer (and
generation after the prompt) sees "\u2581A : Paris".

* text: every token is trained on.
* prompt/completion: ``prompt + completion`` is tokenized together; tokens whose character span
  ends after ``len(prompt)`` are trained on (so a token that straddles the join, such as
  "\u2581Paris" in "A: " + "Paris", is trained: it holds completion text), as TRL's
  completion mask does.
* messages: rendered with the tokenizer's chat template and tokenized once. The characters of
  assistant message ``i`` start where ``messages[:i]`` rendered with the generation prompt
  ends and stop where ``messages[:i + 1]`` ends, so the assistant header is not trained on and
  the template's end-of-turn token is; whitespace the template writes after that token
  (ChatML's and Gemma's "\n") is left out, as generation stops before it. This needs no
  ``{% generation %}`` markers and works for any template whose rendering of a prefix of the
  conversation is a prefix of the rendering of the whole (Llama, Mistral, Gemma, ChatML, ...);
  that is checked for every reply, so a template that rewrites earlier turns raises DataError
  rather than training on the wrong tokens.

Tokenizers without offsets (slow, Python-only ones) fall back to counting the tokens of the
text before the boundary, which must then tokenize to a prefix of the whole (else DataError).

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
        text = data["prompt"] + data["completion"]
        ids, spans = _encode_spans(tokenizer, text, record)
        mask = _char_mask(ids, spans, len(data["prompt"]), len(text))
        ids, mask = _append_eos(tokenizer, ids, mask)
    else:
        ids, mask = _chat(tokenizer, record)
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids, mask = [bos] + ids, [False] + mask
    return Example(np.asarray(ids, np.int32).reshape(-1), np.asarray(mask, bool).reshape(-1))


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _encode_spans(tokenizer, text: str, record: Record):
    """(ids, spans): the tokens of ``text`` and a function ``(start, end) -> (first, stop)`` that
    gives the token range holding the characters ``text[start:end]``."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

        def spans(start, end):
            # token t holds trained characters when its span reaches past `start` (a zero-width
            # token at `start` counts) and begins before `end`; offsets are non-decreasing.
            first = next((t for t, (a, b) in enumerate(offsets) if b > start or a >= start), len(ids))
            stop = next((t for t, (a, b) in enumerate(offsets) if t >= first and a >= end), len(ids))
            return first, max(first, stop)
        return ids, spans

    ids = _encode(tokenizer, text)

    def spans(start, end):
        return _prefix_length(tokenizer, ids, text[:start], record), (
            len(ids) if end >= len(text) else _prefix_length(tokenizer, ids, text[:end], record))
    return ids, spans


def _prefix_length(tokenizer, ids, prefix: str, record: Record) -> int:
    """The number of tokens of ``prefix``, which must tokenize to a prefix of ``ids``."""
    head = _encode(tokenizer, prefix)
    if ids[:len(head)] != head:
        raise DataError(f"{record.where}: cannot find where the trained text starts: {prefix[-40:]!r} "
                        "does not tokenize to a prefix of the whole text, and the tokenizer gives no "
                        "offsets (use a fast tokenizer)")
    return len(head)


def _char_mask(ids, spans, start: int, end: int) -> list[bool]:
    first, stop = spans(start, end)
    return [first <= t < stop for t in range(len(ids))]


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

    def render(n: int, add_generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(
                messages[:n], tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as e:  # jinja errors such as "roles must alternate"
            raise DataError(
                f"{record.where}: the chat template failed on messages[:{n}]: {e}") from e

    def prefix_length(text, prefix, i, what):
        if not text.startswith(prefix):
            raise DataError(
                f"{record.where}: cannot locate the tokens of messages[{i}]: the chat template "
                f"rendering of {what} is not a prefix of the rendering of the whole conversation")
        return len(prefix)

    text = render(len(messages), add_generation_prompt=False)
    ids, spans = _encode_spans(tokenizer, text, record)
    mask = [False] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise DataError(f"{record.where}: messages[0] is an assistant message; a reply "
                            "needs a message before it")
        start = prefix_length(text, render(i, True), i, f"messages[:{i}] + generation prompt")
        end = prefix_length(text, render(i + 1, False), i, f"messages[:{i + 1}]")
        if end <= start:
            continue  # nothing rendered for this reply
        first, stop = spans(start, end)
        stop = _drop_trailing_separator(tokenizer, ids, first, stop)
        mask[first:stop] = [True] * (stop - first)
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
