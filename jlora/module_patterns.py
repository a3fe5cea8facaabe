"""PEFT's module-name rules, with bounded work for patterns read from files someone else wrote.

The rules, exactly as PEFT (`peft.tuners.tuners_utils.check_target_module_exists`,
`peft.utils.other.get_pattern_key`) applies them to a module name m such as `model.layers.0.self_attn.q_proj`:

- `target_modules` as a list: m == entry, or m ends with "." + entry (plain strings, no regex);
- `target_modules` as a string: a full regular-expression match of m;
- `rank_pattern` / `alpha_pattern`: key k applies when `re.match(rf"(.*\\.)?({k})$", m)`; the first key in
  the dict's order that applies wins.

An adapter_config.json can hold any pattern, and Python's `re` can spend minutes on one like `(.|.)*X`.
So patterns run under the `regex` package (the same syntax as `re` in its default VERSION0) with a CPU-time
budget of `BUDGET_S` per field (all keys of one `rank_pattern` share it), counted over every module name the
field is matched against; each name's answer is cached, so repeated look-ups cost nothing. A pattern that
`re` (and so PEFT) rejects, or that exhausts the budget, raises `PatternError` naming the field and the
pattern; callers that read a file add its path.
"""
from __future__ import annotations

import functools
import re
import time
from typing import Mapping, Sequence

import regex

BUDGET_S = 0.25            # CPU seconds per field, over all module names it is matched against
MAX_PATTERN_CHARS = 10_000


# The embedding and the output head (transformers' module names): what modules_to_save / trainable_token_indices
# may name, and the non-linear modules vLLM knows (jlora.vllm_rules). The one spelling of the pair.
HEAD_MODULES = ("embed_tokens", "lm_head")


def head_module(name) -> str | None:
    """`embed_tokens`, `model.embed_tokens` (as PEFT writes modules_to_save) -> embed_tokens (or lm_head); None
    for any other name (or a non-string)."""
    leaf = name.rsplit(".", 1)[-1] if isinstance(name, str) else None
    return leaf if leaf in HEAD_MODULES else None


class PatternError(ValueError):
    """A `target_modules` / `rank_pattern` / `alpha_pattern` entry that is invalid or too costly to match."""


def list_entry_matches(entry: str, module_name: str) -> bool:
    """PEFT's list rule for one `target_modules` entry."""
    return module_name == entry or module_name.endswith("." + entry)


def target_matches(target_modules: Sequence[str] | str, module_name: str) -> bool:
    """Whether PEFT would adapt `module_name` under `target_modules` (a list of names or one regex)."""
    if isinstance(target_modules, str):
        return _matcher("target_modules", (target_modules,), full=True).first(module_name) is not None
    return any(list_entry_matches(e, module_name) for e in target_modules)


def pattern_key(pattern: Mapping[str, object], module_name: str, field: str) -> str | None:
    """The first key of `pattern` (a `rank_pattern` / `alpha_pattern` dict) that applies, or None."""
    if not pattern:
        return None
    keys = tuple(pattern)
    i = _matcher(field, keys, full=False).first(module_name)
    return None if i is None else keys[i]


def check(target_modules: Sequence[str] | str, patterns: Mapping[str, Mapping]) -> None:
    """Compiles every pattern now (types, syntax, size), so a bad one fails before any model is touched.

    `patterns` maps a field name (`rank_pattern`) to its dict.
    """
    if isinstance(target_modules, str):
        _matcher("target_modules", (target_modules,), full=True)
    elif not isinstance(target_modules, (list, tuple, set, frozenset)):
        raise PatternError(f"target_modules: expected a list of module names or one regex string, "
                           f"found {type(target_modules).__name__} {target_modules!r}")
    else:
        for e in target_modules:
            if not isinstance(e, str):
                raise PatternError(f"target_modules entry {e!r}: expected a module name (string), "
                                   f"found {type(e).__name__}")
    for field, pattern in patterns.items():
        if pattern:
            _matcher(field, tuple(pattern), full=False)


class _Matcher:
    """Compiled patterns of one field, a shared CPU budget, and the answer per module name."""

    def __init__(self, field: str, patterns: tuple[str, ...], full: bool):
        self.field, self.patterns, self.full = field, patterns, full
        self.compiled = [_compile(p, field, full) for p in patterns]
        self.budget = BUDGET_S
        self.answers: dict[str, int | None] = {}

    def first(self, name: str) -> int | None:
        """Index of the first pattern that matches `name`, or None."""
        if name in self.answers:
            return self.answers[name]
        answer = None
        for i, p in enumerate(self.compiled):
            if self._run(i, p, name):
                answer = i
                break
        self.answers[name] = answer
        return answer

    def _run(self, i: int, p, name: str) -> bool:
        start = time.thread_time()
        try:
            # `timeout` counts the process's CPU time: with other busy threads it fires early, never late.
            hit = (p.fullmatch if self.full else p.match)(name, timeout=max(self.budget, 1e-3)) is not None
        except TimeoutError:
            hit = None
        self.budget -= time.thread_time() - start
        if hit is None or self.budget <= 0:
            raise PatternError(
                f"{_what(self.field, self.full)} {self.patterns[i]!r} took over {BUDGET_S} s of CPU to match "
                f"module names such as {name!r} (catastrophic backtracking); use a simpler pattern or a list "
                f"of module names")
        return hit


@functools.lru_cache(maxsize=256)
def _matcher(field: str, patterns: tuple[str, ...], full: bool) -> _Matcher:
    return _Matcher(field, patterns, full)


def _what(field: str, full: bool) -> str:
    return "target_modules pattern" if full else f"{field} key"


def _compile(pattern, field: str, full: bool):
    what = _what(field, full)
    if not isinstance(pattern, str):
        raise PatternError(f"{what} {pattern!r}: expected a string, found {type(pattern).__name__}")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise PatternError(f"{what} {pattern[:40]!r}...: {len(pattern)} characters, "
                           f"more than the {MAX_PATTERN_CHARS} allowed")
    text = pattern if full else rf"(.*\.)?({pattern})$"
    try:
        re.compile(text)  # what PEFT (which uses `re`) rejects, jlora rejects too
        return regex.compile(text)
    except (re.error, regex.error, RecursionError, OverflowError, ValueError) as e:
        raise PatternError(f"{what} {pattern!r} is not a valid regular expression: {e}") from None
