"""A run's JSONL log (metrics.jsonl, samples.jsonl) cut back to the step a resumed run continues from.

    kept = the lines whose "step" <= S, in file order;  the file is rewritten with exactly those (atomically)

The resumed run does the steps after S again, so their lines go. The last line may be a write cut short by
a killed run (metrics.jsonl is appended line by line): when it is not a JSON object with an integer "step"
it is dropped too. Blank lines are dropped. Any other line that is not one is an error naming the file and
the line: it was not written by jlora, and guessing which steps it held could lose or repeat lines.
"""
from __future__ import annotations

import json
from pathlib import Path

from jlora.atomic_files import write_text


def cut_to_step(path: str | Path, step: int) -> list[tuple[int, str]]:
    """Rewrites `path` keeping the lines of steps <= `step` (module docstring); returns them as (step, line).
    A missing file stays missing and keeps nothing."""
    path = Path(path)
    if not path.exists():
        return []
    lines = [(n, line) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    kept = []
    for i, (n, line) in enumerate(lines):
        s = line_step(line)
        if s is None:
            if i == len(lines) - 1:
                break  # a torn last write
            raise ValueError(f"{path}:{n}: expected a JSON object with an integer \"step\", found {line[:80]!r}")
        if s <= step:
            kept.append((s, line))
    write_text(path, "".join(line + "\n" for _, line in kept))
    return kept


def line_step(line: str) -> int | None:
    """The "step" of one JSONL line; None for a line that is not a JSON object with an integer step."""
    try:
        s = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError, IndexError):
        return None
    return s if isinstance(s, int) and not isinstance(s, bool) else None
