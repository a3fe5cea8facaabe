"""Where each assistant reply lies in a chat template's rendering of the whole conversation.

A record's conversation is rendered ONCE, ``text = render(messages)``, and the model trains on that
text. For every assistant message ``i`` this module finds, in ``text``, the characters the model
would generate after the generation prompt, without knowing the template's markers:

* ``start``: where the prompt ends. ``render(messages[:i], add_generation_prompt=True)`` is the
  text a server feeds the model before it writes reply ``i``; ``start`` is the length of its
  longest common prefix with ``text``. The role header (``<|im_start|>assistant\\n``,
  ``<start_of_turn>model\\n``, ``<|assistant|>\\n``, ``<|im_start|>assistant<|im_sep|>``) is
  therefore never trained, and neither is what the generation prompt itself writes (Qwen3's
  ``<think>\\n\\n</think>\\n\\n`` under ``enable_thinking=False``, SmolLM3's under ``/no_think``).
  What the template adds after the header only because the reply is there (Qwen3's
  ``<think>...</think>`` block under the default ``enable_thinking``) is trained: the model
  writes it itself.
* ``content_end``: where the reply's own text ends in ``text``. The conversation is rendered
  once more with every message's content wrapped in its own pair of private-use characters; with
  the marks removed that rendering must equal ``text``, and the marks' positions give each
  content's place. (Where the marks change the rendering, e.g. Gemma's ``| trim`` cannot strip
  spaces inside them, each content is found instead by one rendering with a mark around it
  alone: the common prefix and suffix with ``text`` bound it.) This handles templates that
  rewrite a reply once more turns follow: Qwen3 drops the ``<think>`` block of every reply
  before the last user turn, so reply ``i`` does not render the same in
  ``render(messages[:i + 1])`` as in ``text``.
* ``end``: ``content_end`` plus what the template writes after the content when the reply is the
  last message (``<|im_end|>\\n``, ``<end_of_turn>\\n``, ``<|end|>\\n``, tool calls), as far as
  ``text`` writes the same. Phi-3's conversation-final ``eos_token`` is in that tail only for the
  last reply; tokenize.py trains the tail up to its first special token (the end-of-turn token)
  and no further.

Checks (DataError naming the record): every assistant message must appear in the rendering (its
content changes the text), messages must render in order (the content of ``messages[j]`` ends
before that of ``messages[j + 1]``), a reply's prompt must cover every earlier message, and a
reply rendered as the last message must continue its generation prompt (it does not when Qwen3's
``enable_thinking=False`` prompt ends in an empty ``<think></think>`` block but the reply carries
reasoning; then no split of the text into prompt and reply is right).
"""

import itertools
import re
from typing import NamedTuple

from jlora.data.errors import DataError
from jlora.data.jsonl import Record


class ReplySpan(NamedTuple):
    """Character offsets into the rendered conversation of one assistant message ``index``:
    ``text[start:end]`` is trained; ``text[content_end:end]`` is what the template writes after
    the reply's content (its end of turn)."""

    index: int
    start: int
    content_end: int
    end: int


def template_kwargs(record: Record, defaults=None) -> dict:
    """Keyword arguments for the chat template (``enable_thinking``, ...): ``defaults`` updated by
    the record's optional ``"chat_template_kwargs"`` object."""
    extra = record.data.get("chat_template_kwargs", {})
    if not isinstance(extra, dict):
        raise DataError(f'{record.where}: field "chat_template_kwargs" must be an object, '
                        f"found {type(extra).__name__}")
    return {**(defaults or {}), **extra}


def reply_spans(tokenizer, record: Record, kwargs: dict) -> tuple[str, list[ReplySpan]]:
    """(the rendered conversation, one ReplySpan per assistant message, in order)."""
    messages = record.data["messages"]
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f'{record.where}: the "messages" format needs a chat template, '
                        "and the tokenizer has none")

    def render(msgs, add_generation_prompt=False) -> str:
        try:
            return tokenizer.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)
        except Exception as e:  # jinja errors such as "roles must alternate"
            raise DataError(f"{record.where}: the chat template failed on messages[:{len(msgs)}]: "
                            f"{e}") from e

    text = render(messages)
    bounds, marked = _marked_bounds(render, messages, text, record)
    if marked is None:  # the marks changed the rendering (e.g. `trim` keeps spaces inside them)
        mark = _unused_marks(1, text, messages, record)[0]
        bounds = [_bounds_by_diff(render, messages, j, text, mark) for j in range(len(messages))]
    _check_order(bounds, messages, record)

    replies, done = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        where = f"{record.where}: cannot locate the tokens of messages[{i}]"
        if i == 0:
            raise DataError(f"{record.where}: messages[0] is an assistant message; a reply "
                            "needs a message before it")
        if bounds[i] is None:
            raise DataError(f"{where}: the chat template does not render its content (changing "
                            "it leaves the rendered conversation unchanged)")
        first, content_end = bounds[i]
        before = max((b[1] for b in bounds[:i] if b is not None), default=0)
        prompt = render(messages[:i], True)
        start = min(_common_prefix(prompt, text), first)
        if start < max(before, done):
            raise DataError(
                f"{where}: the rendering of messages[:{i}] with the generation prompt matches the "
                f"whole conversation only up to character {start}, before the end of the earlier "
                f"messages (character {max(before, done)}); the template renders earlier turns "
                "differently once later ones follow")
        if marked is not None:
            alone, alone_bounds = _strip_marks(render(marked[:i + 1]), marked.marks, i)
        else:
            alone = render(messages[:i + 1])
            alone_bounds = _bounds_by_diff(render, messages[:i + 1], i, alone, mark)
        if not alone.startswith(prompt):
            raise DataError(
                f"{where}: as the last message it does not continue the generation prompt (the "
                f"template writes {prompt[_common_prefix(prompt, alone):][:40]!r} after messages[:{i}] "
                f"but renders the reply as {alone[_common_prefix(prompt, alone):][:40]!r}); e.g. a "
                "reply with reasoning under enable_thinking=False")
        tail = alone[alone_bounds[1]:] if alone_bounds else ""
        end = content_end + _common_prefix(tail, text[content_end:])
        replies.append(ReplySpan(i, start, content_end, end))
        done = end
    return text, replies


class _Marked(list):
    """The messages with each content wrapped in its own pair of marks: ``marks[2j]`` before
    and ``marks[2j + 1]`` after ``messages[j]["content"]``."""

    marks: str


def _marked_bounds(render, messages, text: str, record: Record):
    """One rendering with every content wrapped in its own marks: (bounds per message, the
    marked messages), or (None, None) when removing the marks does not give back ``text``."""
    marks = _unused_marks(2 * len(messages), text, messages, record)
    marked = _Marked({**m, "content": marks[2 * j] + m["content"] + marks[2 * j + 1]}
                     for j, m in enumerate(messages))
    marked.marks = marks
    stripped, found = _find_marks(render(marked), marks)
    if stripped != text or any(len(p) > 1 for p in found.values()):
        return None, None
    return [_bounds(found, marks, j) for j in range(len(messages))], marked


def _strip_marks(rendered: str, marks: str, j: int):
    """(``rendered`` without marks, (first, end) of messages[j]'s content in it, or None)."""
    stripped, found = _find_marks(rendered, marks)
    return stripped, _bounds(found, marks, j)


def _find_marks(rendered: str, marks: str):
    """(``rendered`` without the marks, mark -> its offsets in that stripped text)."""
    found = {m: [] for m in marks}
    for removed, hit in enumerate(re.finditer(f"[{re.escape(marks)}]", rendered)):
        found[hit.group()].append(hit.start() - removed)
    return rendered.translate(dict.fromkeys(map(ord, marks))), found


def _bounds(found, marks: str, j: int):
    before, after = found[marks[2 * j]], found[marks[2 * j + 1]]
    if not after:
        return None
    return (before[0] if before else after[0]), after[0]


def _bounds_by_diff(render, msgs, i, rendered, mark):
    """(first, end) offsets in ``rendered`` (= render(msgs)) where msgs[i]'s content shows, found
    by rendering with a mark around the content; None when that changes nothing."""
    marked = list(msgs)
    marked[i] = {**msgs[i], "content": mark + msgs[i]["content"] + mark}
    other = render(marked)
    if other == rendered:
        return None
    head = _common_prefix(rendered, other)
    tail = _common_prefix(rendered[::-1], other[::-1])
    end = max(head, len(rendered) - tail)
    return min(head, end), end


def _check_order(bounds, messages, record: Record) -> None:
    last, last_j = -1, None
    for j, b in enumerate(bounds):
        if b is None:
            continue
        if b[1] <= last:
            raise DataError(
                f"{record.where}: the chat template renders messages[{j}] "
                f"({messages[j]['role']}) before messages[{last_j}] ({messages[last_j]['role']}); "
                "cannot tell which tokens belong to which message")
        last, last_j = b[1], j


def _unused_marks(n: int, text: str, messages, record: Record) -> str:
    """``n`` characters of Unicode's private use area that occur nowhere in the conversation."""
    used = set(text).union(*(m["content"] for m in messages))
    free = list(itertools.islice((c for c in map(chr, range(0xE000, 0xF900)) if c not in used), n))
    if len(free) < n:
        raise DataError(f"{record.where}: the conversation uses too many private-use characters "
                        f"(U+E000..U+F8FF) to mark its {len(messages)} messages")
    return "".join(free)


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo
