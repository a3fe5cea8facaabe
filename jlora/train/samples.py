"""Samples during training (`--sample-every N [--sample-prompts p.jsonl]`): what the model answers, as it learns.

    sampled steps   0 (before the first step), every multiple of N, and the last step
    answers         greedy (jlora.generate, temperature 0), at most MAX_NEW_TOKENS new tokens per prompt, by
                    the current model + adapter; nothing of the training state changes (metrics.jsonl is
                    bit-equal with and without samples: tests/train/test_samples.py)
    prompts         --sample-prompts: JSONL lines {"prompt": str} | {"messages": [...]} (jlora.generate.prompts);
                    unset: the first DEFAULT_COUNT eval records (the train records when there is no eval set):
                    a prompt+completion record's prompt, a conversation up to its last assistant reply, the
                    first half of a text record's words
    <out>/samples.jsonl   one line per prompt per sampled step: {"step", "prompt", "answer"}

The file is rewritten whole and atomically (jlora.atomic_files.write_text) after each sampled step, so a kill
leaves every step's lines complete or absent. On --resume from step S the lines after S are dropped, and a
step whose lines are already there is not sampled again: a resumed run's file equals an uninterrupted one's.
At the end of a run `summary` gives the first and last sampled step's answers side by side (before/after).

Several processes (jax.distributed): every process samples the same prompts at the same steps, running
jlora.generate together on the params sharded over all of them (jlora.generate.decode: inputs replicated over
the params' mesh, what the host reads gathered to each process, so all take the same loop branches); the
answers are then the same on every process and process 0 alone writes the file (as it writes metrics.jsonl).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

from jlora.atomic_files import write_text
from jlora.data.formats import record_format
from jlora.train.jsonl_resume import cut_to_step, line_step

DEFAULT_COUNT = 3        # default prompts (the first eval records)
MAX_NEW_TOKENS = 32      # per prompt and sampled step: samples show the trend, they are not the eval
FILE = "samples.jsonl"


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One sample prompt: `value` as jlora.generate takes it (a string, or messages with chat=True)."""
    value: Any
    chat: bool


def from_file(path: str | Path) -> list[Prompt]:
    """The prompts of a --sample-prompts file; a missing file or a bad line is a ValueError naming it."""
    from jlora.generate.prompts import read_prompts
    return [Prompt(value, chat) for _, value, chat in read_prompts(path)]


def from_config(config) -> list[Prompt] | None:
    """The --sample-prompts file's prompts (None when not given), read before the run starts."""
    if not config.sample_prompts:
        return None
    if not config.sample_every:
        raise ValueError(f"--sample-prompts {config.sample_prompts}: samples are taken with --sample-every N "
                         "(steps between samples), which is 0 (never)")
    return from_file(config.sample_prompts)


def from_records(records: Sequence, count: int = DEFAULT_COUNT) -> list[Prompt]:
    """Prompts from the first `count` data records (jlora.data Records) that give one."""
    out = []
    for record in records:
        if len(out) == count:
            break
        kind, data = record_format(record), record.data
        if kind == "prompt_completion":
            out.append(Prompt(data["prompt"], False))
        elif kind == "messages":
            messages = list(data["messages"])
            last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
            head = messages[:last] if last is not None else messages
            if any(m.get("role") == "user" for m in head):
                out.append(Prompt(head, True))
        else:
            words = data["text"].split(" ")
            if len(words) > 1:
                out.append(Prompt(" ".join(words[:len(words) // 2]), False))
    return out


def for_run(config, out: str | Path, prompts: list[Prompt], *, last_step: int, start: int) -> "Samples | None":
    """A run's Samples; None without --sample-every. Every process takes them; process 0 writes the file."""
    from jlora.train import hosts
    if not config.sample_every:
        return None
    resume_from = start if config.resume else None

    def make():
        return Samples(out, prompts, every=config.sample_every, last_step=last_step, resume_from=resume_from,
                       write=hosts.is_main())
    if resume_from is None:
        return make()
    sampler = make() if hosts.is_main() else None  # process 0 cuts the file back to the resumed step,
    hosts.barrier("jlora: samples.jsonl cut to the resumed step")  # then the others read the same steps
    return sampler or make()


class Samples:
    """The samples of one run: which steps are due, taking them, the file, the before/after summary."""

    def __init__(self, out: str | Path, prompts: list[Prompt], *, every: int, last_step: int,
                 resume_from: int | None = None, max_new_tokens: int = MAX_NEW_TOKENS, write: bool = True):
        self.path = Path(out) / FILE
        self.prompts, self.every, self.last_step, self.max_new_tokens = prompts, every, last_step, max_new_tokens
        self.write = write  # False on processes other than 0: they sample along (SPMD) but write nothing
        kept = [] if resume_from is None else _kept(self.path, resume_from, cut=write)
        self.lines: list[str] = [line for _, line in kept]
        self.done = {step for step, _ in kept}

    def due(self, step: int) -> bool:
        """Whether `step` (optimizer steps done: 0 before the first) is sampled and not yet in the file."""
        if not self.every or not self.prompts or step in self.done:
            return False
        return step in (0, self.last_step) or step % self.every == 0

    def take(self, step: int, model, tokenizer) -> None:
        """Greedy answers of `model` to every prompt, added to the file as `step`'s lines."""
        from jlora.generate.api import generate

        answers: dict[int, str] = {}
        for chat in (False, True):  # one batch per kind (plain text, chat template)
            index = [i for i, p in enumerate(self.prompts) if p.chat == chat]
            if index:
                texts = generate(model, tokenizer, [self.prompts[i].value for i in index], chat=chat,
                                 max_new_tokens=self.max_new_tokens)
                answers.update(zip(index, map(str, texts)))
        self.lines += [json.dumps({"step": step, "prompt": p.value, "answer": answers[i]}, ensure_ascii=False)
                       for i, p in enumerate(self.prompts)]
        self.done.add(step)
        if self.write:
            write_text(self.path, "".join(line + "\n" for line in self.lines))

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.lines]

    def summary(self, width: int = 72) -> list[str]:
        """Lines showing each prompt's answer at the first and the last sampled step (empty: one step or none)."""
        records = self.records()
        steps = sorted({r["step"] for r in records})
        if len(steps) < 2:
            return []
        first, last = ([r for r in records if r["step"] == s] for s in (steps[0], steps[-1]))
        lines = [f"samples ({self.path}, greedy): step {steps[0]} -> step {steps[-1]}"]
        for before, after in zip(first, last):
            lines += [f"  {_short(before['prompt'], width)}",
                      f"    before: {_short(before['answer'], width)}",
                      f"    after:  {_short(after['answer'], width)}"]
        return lines


def _kept(path: Path, step: int, *, cut: bool) -> list[tuple[int, str]]:
    """(step, line) of the lines through `step`: the file cut back to them (jlora.train.jsonl_resume), or, by
    a process that does not write (cut: False), read as process 0 left it after cutting."""
    if cut:
        return cut_to_step(path, step)
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    return [(line_step(line), line) for line in lines if line.strip()]


def _short(value, width: int) -> str:
    """A one-line repr of a prompt or answer, cut to `width` characters."""
    if isinstance(value, list):  # messages: the last turn
        value = value[-1].get("content", "") if value else ""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[:width - 4] + '..."'
