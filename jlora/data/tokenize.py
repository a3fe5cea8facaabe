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
* messages: rendered with the tokenizer's chat template and tokenized once. For each assistant
  message the trained characters run from where the generation prompt ends (so the role header
  is never trained) through the template's end-of-turn token (``<|im_end|>``, ``<end_of_turn>``,
  ``<|end|>``, ``<|eot_id|>``, ``</s>``: the first special token after the reply's text, which
  the model must learn to emit); whitespace or a conversation-final EOS that the template writes
  after it is left out, as generation stops before it. chat_spans.py finds these characters
  without the template's markers or ``{% generation %}`` tags, also for templates that rewrite
  earlier turns (Qwen3 drops the reasoning of replies before the last user turn); a template
  that drops a reply or renders messages out of order raises DataError naming the record.
  Qwen3's ``<think>...</think>`` block (empty or not) is trained when the template writes it
  after the generation prompt (the default ``enable_thinking``), as TRL's and Unsloth's
  assistant-only masks do; with ``enable_thinking=False`` the empty block is part of the prompt
  and is not. Template options come from ``chat_template_kwargs`` (argument or record field).

Tokenizers without offsets (slow, Python-only ones) fall back to counting the tokens of the
text before the boundary, which must then tokenize to a prefix of the whole (else DataError).

BOS is prepended when the tokenizer has one and the tokens don't already start with it.
EOS is appended to text and completions (unless already there); for messages the
template's own end-of-turn tokens end each reply.
"""

from typing import NamedTuple

import numpy as np

from jlora.data.chat_spans import reply_spans, template_kwargs
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


def tokenize_record(record: Record, tokenizer, *, chat_template_kwargs=None) -> Example:
    """Tokenizes a record with a transformers tokenizer (see the module docstring).

    ``chat_template_kwargs`` (e.g. ``{"enable_thinking": False}``) are passed to the chat template
    of "messages" records; a record's own ``"chat_template_kwargs"`` object overrides them.
    """
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
        ids, mask = _chat(tokenizer, record, chat_template_kwargs)
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


def _chat(tokenizer, record: Record, defaults):
    text, replies = reply_spans(tokenizer, record, template_kwargs(record, defaults))
    ids, spans = _encode_spans(tokenizer, text, record)
    mask = [False] * len(ids)
    special = _special_ids(tokenizer)
    for reply in replies:
        first, stop = spans(reply.start, reply.end)
        tail = max(first, _token_at(spans, reply.content_end, reply.end, first))
        stop = _end_of_turn(tokenizer, ids, special, tail, stop)
        mask[first:stop] = [True] * (stop - first)
    return ids, mask


def _token_at(spans, start: int, end: int, fallback: int) -> int:
    """The first token holding ``text[start:end]``; ``fallback`` where a tokenizer without offsets
    cannot split the text there."""
    try:
        return spans(start, end)[0]
    except DataError:
        return fallback


def _special_ids(tokenizer) -> set[int]:
    special = set(tokenizer.all_special_ids)
    special.update(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)
    return special


def _end_of_turn(tokenizer, ids, special, tail: int, stop: int) -> int:
    """The trained tokens of a reply stop after the first special token the template writes after
    the content (its end-of-turn token: ``<|im_end|>``, ``<end_of_turn>``, ``<|end|>``,
    ``<|eot_id|>``, ``</s>``); generation stops there, so what follows it (ChatML's and Gemma's
    "\n", Phi-3's conversation-final EOS) is not trained. Without a special token in the tail,
    trailing whitespace-only tokens are left out."""
    for t in range(tail, stop):
        if ids[t] in special:
            return t + 1
    while stop > tail and not tokenizer.decode(ids[stop - 1:stop]).strip():
        stop -= 1
    return stop
