"""A JSONL file of prompts, as `jlora generate --prompts` and `jlora train --sample-prompts` read it.

    {"prompt": "What is LoRA?"}                                   plain text (through the chat template
                                                                  with chat=True)
    {"messages": [{"role": "user", "content": "..."}, ...]}       a conversation: always the chat template

Blank lines are skipped; other keys of a line are kept (jlora generate copies them to its output).
Errors name the file and the line.
"""
from __future__ import annotations

import json
from pathlib import Path


def read_prompts(path: str | Path, chat: bool = False) -> list[tuple[dict, object, bool]]:
    """(the line's object, its prompt, whether it is a conversation) per non-empty line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"{path}: cannot read the prompts file ({e.strerror or e})") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path} line {n}: not valid JSON ({e})") from None
        if isinstance(record, dict) and isinstance(record.get("messages"), list):
            out.append((record, record["messages"], True))
        elif isinstance(record, dict) and isinstance(record.get("prompt"), str):
            out.append((record, record["prompt"], chat))
        else:
            raise ValueError(f'{path} line {n}: expected an object with "prompt" (a string) or "messages" '
                             f"(a list), found {line.strip()[:80]}")
    if not out:
        raise ValueError(f"{path}: no prompts (expected JSON lines with \"prompt\" or \"messages\")")
    return out
