"""`jlora generate --model DIR [--adapter A | --run RUN] --prompts p.jsonl --out answers.jsonl`.

Each line of --prompts is {"prompt": "..."} (plain text; with --chat: one user turn through the chat
template) or {"messages": [{"role": ..., "content": ...}, ...]} (always the chat template). Each line of
--out is the input line plus "completion" (the text), "token_ids" and "finish_reason" (eos | length |
cache), in the input order; the file is written once, atomically, at the end.

The model: --model (a checkpoint dir or Hub id), with --adapter (a PEFT/jlora adapter dir or a `jlora
train` run dir); --run RUN alone takes RUN/adapter and the run's base (RUN/base of a demo run, else the
base named by the adapter). The shared flags are defined here and reused by `jlora chat`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path


def add_model_args(p) -> None:
    p.add_argument("--model", default=None, metavar="DIR", help="base checkpoint dir or Hub id (default: the base "
                                                                "of --run / the one --adapter names)")
    p.add_argument("--adapter", default=None, metavar="DIR", help="LoRA adapter dir (PEFT, Unsloth or jlora), or a "
                                                                  "`jlora train` run dir")
    p.add_argument("--run", default=None, metavar="DIR", help="a `jlora train` run dir: its adapter and its base")
    p.add_argument("--quantize", default=None, choices=["nf4"], help="load the base as NF4 (QLoRA)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default float32)")
    p.add_argument("--allow-pickle", action="store_true", help="read pytorch_model.bin / adapter_model.bin")


def add_sampling_args(p) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="per prompt, at most (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="keep the K most likely tokens")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass in (0, 1]")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R", help="> 1 discourages repeats")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (with --temperature > 0)")
    p.add_argument("--max-len", type=int, default=None, metavar="L",
                   help="KV cache length (default: longest prompt + --max-new-tokens)")
    p.add_argument("--truncate", action="store_true", help="keep the last tokens of prompts longer than --max-len")


def register(sub):
    from jlora.commands.help_format import examples
    p = sub.add_parser("generate", help="answers for a JSONL file of prompts (base model, or with a LoRA adapter)",
                       epilog=examples(
                           "jlora generate --run runs/x --prompts prompts.jsonl --out answers.jsonl",
                           "jlora generate --model path/to/base --adapter runs/x/adapter --prompts prompts.jsonl "
                           "--out answers.jsonl --chat --temperature 0.7 --top-p 0.9"))
    add_model_args(p)
    p.add_argument("--prompts", required=True, metavar="FILE", help='JSONL: {"prompt": ...} or {"messages": [...]}')
    p.add_argument("--out", required=True, metavar="FILE", help="JSONL written: each input line + completion")
    p.add_argument("--chat", action="store_true", help='"prompt" lines go through the chat template too')
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="prompts decoded together (default 8)")
    add_sampling_args(p)
    p.set_defaults(func=run)
    return p


def _base_of_run(run: Path, adapter_dir: Path) -> Path | str:
    """RUN/base (a demo run), else the base the adapter names (base_model_name_or_path)."""
    if (run / "base" / "config.json").is_file():
        return run / "base"
    from jlora.ranks.adapter import read_adapter
    from jlora.ranks.drift import named_base
    base, missing = named_base(read_adapter(adapter_dir), fetch=True)
    if base is None:
        raise ValueError(f"--run {run}: cannot find the base model ({missing}); pass --model DIR")
    return base


def load_model(args):
    """(model, tokenizer, a one-line description) from --model / --adapter / --run."""
    from jlora.convert.hf_checkpoint import load_hf
    from jlora.convert.model_dir import load_tokenizer, open_model_dir
    from jlora.convert.peft_adapter import load_adapter
    from jlora.ranks.adapter import resolve_adapter_dir

    if args.run and args.adapter:
        raise ValueError("--run and --adapter both name an adapter; pass one")
    adapter_dir = resolve_adapter_dir(args.run or args.adapter) if (args.run or args.adapter) else None
    model_arg = args.model
    if model_arg is None:
        if adapter_dir is None:
            raise ValueError("no model: pass --model DIR (and --adapter DIR), or --run RUN_DIR")
        model_arg = _base_of_run(Path(args.run or args.adapter), adapter_dir)
    model_dir = open_model_dir(model_arg, allow_pickle=args.allow_pickle)
    model = load_hf(model_dir, dtype=args.dtype, quantize=args.quantize, allow_pickle=args.allow_pickle)
    what = f"{model_dir}"
    if adapter_dir is not None:
        model = load_adapter(model, adapter_dir, allow_pickle=args.allow_pickle)
        what += f" + {adapter_dir}"
    return model, load_tokenizer(model_dir), what


def sampling_kwargs(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed, max_len=args.max_len,
                truncate=args.truncate)


def run(args) -> int:
    from jlora.atomic_files import write_text
    from jlora.generate.api import generate
    from jlora.generate.prompts import read_prompts

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, found {args.batch_size}")
    items = read_prompts(Path(args.prompts), args.chat)
    model, tokenizer, what = load_model(args)
    print(f"generating {len(items)} answers with {what} ...", flush=True)
    lines, tokens, began = [], 0, time.perf_counter()
    i = 0
    while i < len(items):  # batches of consecutive lines of the same kind (plain text or chat)
        kind = items[i][2]
        batch = []
        while i < len(items) and len(batch) < args.batch_size and items[i][2] == kind:
            batch.append(items[i])
            i += 1
        answers = generate(model, tokenizer, [prompt for _, prompt, _ in batch], chat=kind, **sampling_kwargs(args))
        for (record, _, _), answer in zip(batch, answers):
            lines.append(json.dumps({**record, "completion": str(answer), "token_ids": answer.token_ids,
                                     "finish_reason": answer.finish_reason}, ensure_ascii=False))
            tokens += len(answer.token_ids)
    write_text(args.out, "\n".join(lines) + "\n")
    seconds = time.perf_counter() - began
    print(f"wrote {len(lines)} answers to {args.out} ({tokens} tokens in {seconds:.1f} s, compilation included)")
    return 0
