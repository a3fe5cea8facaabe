"""`jlora.generate(model, tokenizer, prompts, ...)`: text in, text out, through jlora.generate.decode.

    prompts   strings, tokenized as the tokenizer does for a plain call (its BOS included); or with
              chat=True, conversations ([{"role": ..., "content": ...}, ...], or a string as one user
              turn) rendered by the tokenizer's chat template with the generation prompt appended
    stop      the eos ids of the model's generation_config.json (else config.json, else the tokenizer's
              eos token), or `eos_token_id=` given here; a row's text ends before its eos token
    returns   one `Completion` per prompt: the text (a str), with .token_ids and .finish_reason
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

from jlora.generate.decode import generate_tokens
from jlora.generate.sampler import SamplingConfig


class Completion(str):
    """The generated text of one prompt (special tokens skipped), with `token_ids` (the new ids, through the
    eos id when it stopped there), `finish_reason` ("eos" | "length" | "cache") and `prompt_ids`."""
    token_ids: list[int]
    finish_reason: str
    prompt_ids: list[int]

    def __new__(cls, text: str, token_ids: list[int], finish_reason: str, prompt_ids: list[int]):
        self = super().__new__(cls, text)
        self.token_ids, self.finish_reason, self.prompt_ids = token_ids, finish_reason, prompt_ids
        return self


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def stop_ids(model, tokenizer=None) -> tuple[list[int], int | None]:
    """(eos ids, pad id) as transformers' generate would take them for this model: generation_config.json,
    then config.json, then the tokenizer. The model's checkpoint dir is `model.source_dir` (load_hf sets it)."""
    source = getattr(model, "source_dir", None)
    files = [Path(source) / n for n in ("generation_config.json", "config.json")] if source else []
    eos, pad = [], None
    for d in map(_read_json, files):
        eos = eos or _ids(d.get("eos_token_id"))
        pad = pad if pad is not None else d.get("pad_token_id")
    if not eos and tokenizer is not None:
        eos = _ids(getattr(tokenizer, "eos_token_id", None))
    if pad is None and tokenizer is not None:
        pad = getattr(tokenizer, "pad_token_id", None)
    return eos, pad


def _where(model, tokenizer) -> str:
    return getattr(model, "source_dir", None) or getattr(tokenizer, "name_or_path", None) or "the model"


def encode(tokenizer, prompts, *, chat: bool = False, where: str = "the model",
           chat_template_kwargs: dict[str, Any] | None = None) -> list[list[int]]:
    """Token ids of each prompt: plain text as tokenizer(text), or a conversation through the chat template."""
    if isinstance(prompts, (str, dict)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError(f"prompts must be a non-empty list (of strings{', or of message lists' if chat else ''}), "
                         f"found {type(prompts).__name__}")
    if not chat:
        bad = next((i for i, p in enumerate(prompts) if not isinstance(p, str)), None)
        if bad is not None:
            raise ValueError(f"prompt {bad}: expected a string, found {type(prompts[bad]).__name__} (conversations "
                             "need chat=True)")
        return [list(tokenizer(p)["input_ids"]) for p in prompts]
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"chat=True needs a chat template, but the tokenizer of {where} has none "
                         "(its tokenizer_config.json / chat_template.jinja); pass plain prompts with chat=False")
    out = []
    for i, conv in enumerate(prompts):
        messages = [{"role": "user", "content": conv}] if isinstance(conv, str) else conv
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise ValueError(f"prompt {i}: expected a string or a list of {{'role', 'content'}} messages, "
                             f"found {conv!r:.80}")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             **(chat_template_kwargs or {}))
        out.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return out


def _multi_adapter_model(base, adapters, adapter_ids, rows: int):
    from jlora.generate import multi_lora

    if adapters is None or adapter_ids is None:
        raise ValueError("adapters= and adapter_ids= go together: adapters names the dirs, adapter_ids picks one "
                         "(or None) per prompt")
    indices = multi_lora.row_indices(list(adapters), adapter_ids, rows)  # bad ids fail before any loading
    model, _ = multi_lora.build(base, adapters)
    multi_lora.set_rows(model, indices)
    return model


class _TextStream:
    """Turns per-step token ids into text pieces per row: decode the row so far, emit the new suffix
    (held back while it ends in an incomplete UTF-8 sequence)."""

    def __init__(self, tokenizer, rows: int, callback: Callable[[int, str], None], eos: list[int]):
        self.tokenizer, self.callback, self.eos = tokenizer, callback, set(eos)
        self.ids = [[] for _ in range(rows)]
        self.sent = [""] * rows
        self.stopped = [False] * rows

    def __call__(self, tokens, done) -> None:
        for row, token in enumerate(tokens.tolist()):
            if self.stopped[row]:
                continue
            self.stopped[row] = bool(done[row])
            if token in self.eos:
                continue
            self.ids[row].append(token)
            text = self.tokenizer.decode(self.ids[row], skip_special_tokens=True)
            if text.endswith("\ufffd"):
                continue
            if len(text) > len(self.sent[row]):
                self.callback(row, text[len(self.sent[row]):])
            self.sent[row] = text

    def finish(self, texts: list[str]) -> None:
        """Sends what was held back (a text that really ends in an incomplete sequence)."""
        for row, text in enumerate(texts):
            if len(text) > len(self.sent[row]) and text.startswith(self.sent[row]):
                self.callback(row, text[len(self.sent[row]):])


def generate(model, tokenizer, prompts, *, max_new_tokens: int = 128, temperature: float = 0.0,
             top_k: int | None = None, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int = 0,
             chat: bool = False, chat_template_kwargs: dict[str, Any] | None = None,
             eos_token_id: int | Sequence[int] | None = None, max_len: int | None = None, truncate: bool = False,
             stream: Callable[[int, str], None] | None = None, adapters: dict[str, Any] | None = None,
             adapter_ids: Sequence[str | None] | None = None) -> list[Completion]:
    """Completions of `prompts` by `model` (a jlora CausalLM: with or without LoRA, NF4 or dense).

        out = jlora.generate(model, tok, ["What is LoRA?"], max_new_tokens=64, temperature=0.7, top_p=0.9)
        print(out[0], out[0].token_ids, out[0].finish_reason)

    temperature 0 is greedy (transformers' do_sample=False); top_k, top_p and repetition_penalty act as
    transformers' processors (jlora.generate.sampler); seed fixes the draws. max_len: the KV cache length
    (default: the longest prompt plus max_new_tokens); a prompt longer than it is an error unless
    truncate=True (then its last tokens are kept). stream(row, text): called with each new piece of text.

    adapters={"a": dir_a, "b": dir_b} with adapter_ids=["a", None, "b", ...] (one per prompt, None = the
    base): each row runs its own adapter in the same batch (jlora.generate.multi_lora; `model` is the base,
    without LoRA, and stays unchanged).
    """
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p,
                              repetition_penalty=repetition_penalty, seed=seed)
    where = _where(model, tokenizer)
    if adapters is not None or adapter_ids is not None:
        model = _multi_adapter_model(model, adapters, adapter_ids, len(prompts))
    ids = encode(tokenizer, prompts, chat=chat, where=where, chat_template_kwargs=chat_template_kwargs)
    eos, pad = stop_ids(model, tokenizer)
    if eos_token_id is not None:
        eos = _ids(eos_token_id)
    pad = pad if pad is not None else (eos[0] if eos else 0)
    on_step = None if stream is None else _TextStream(tokenizer, len(ids), stream, eos)
    outputs = generate_tokens(model, ids, max_new_tokens=max_new_tokens, sampling=sampling, eos_token_ids=eos,
                              pad_token_id=pad, max_len=max_len, truncate=truncate, on_step=on_step)
    done = [Completion(tokenizer.decode([t for t in o.token_ids if t not in eos], skip_special_tokens=True),
                       o.token_ids, o.finish_reason, o.prompt_ids) for o in outputs]
    if on_step is not None:
        on_step.finish(done)
    return done
