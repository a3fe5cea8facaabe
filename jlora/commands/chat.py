"""`jlora chat --model DIR [--adapter A | --run RUN]`: talk to a model in the terminal, replies streamed.

Each line read from stdin is one user turn; the whole conversation so far (an optional --system
message, every user turn and every reply) goes through the tokenizer's chat template with the
generation prompt, so the model sees the history each turn. `/reset` starts a new conversation,
`/exit` (or end of input) ends. Without a terminal (a pipe) only the replies are printed, one per line.
"""
from __future__ import annotations

import sys

from jlora.commands.generate import add_model_args, add_sampling_args, load_model, sampling_kwargs


def register(sub):
    from jlora.commands.help_format import examples
    p = sub.add_parser("chat", help="interactive chat with a model (base, or with a LoRA adapter), streamed",
                       epilog=examples("jlora chat --run runs/x --system 'Answer in one sentence.'",
                                       "echo 'What is LoRA?' | jlora chat --model path/to/base --max-new-tokens 64"))
    add_model_args(p)
    p.add_argument("--system", default=None, metavar="TEXT", help="a system message opening the conversation")
    add_sampling_args(p)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from jlora.generate.api import generate

    model, tokenizer, what = load_model(args)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{what}: the tokenizer has no chat template, which `jlora chat` needs "
                         "(use `jlora generate` for plain prompts)")
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {what}; /reset starts over, /exit or Ctrl-D ends", flush=True)
    opening = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(opening)
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            messages = list(opening)
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        reply = generate(model, tokenizer, [messages], chat=True,
                         stream=lambda _row, piece: print(piece, end="", flush=True), **sampling_kwargs(args))[0]
        print(flush=True)
        messages.append({"role": "assistant", "content": str(reply)})
