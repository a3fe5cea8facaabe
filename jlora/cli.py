"""`jlora` command line. Each subcommand lives in `jlora/commands/<name>.py` and is listed here.

Errors a user can cause (a bad file, flag or setting) end the command with one line on stderr,
`jlora <command>: error: <what was expected, what was found, where>`, and exit status 2; anything
else that escapes a command is reported the same way as an internal error (status 1). `--debug`
(anywhere on the line) or `JLORA_DEBUG=1` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# Subcommand modules, in the order `jlora --help` lists them.
COMMANDS = [
    "jlora.commands.train",
    "jlora.commands.plan",
    "jlora.commands.ranks",
    "jlora.commands.sweep",
    "jlora.commands.inspect",
    "jlora.commands.export",
    "jlora.commands.generate",
    "jlora.commands.chat",
]

# Exceptions that mean "bad input", not "a bug": CheckpointError, ConfigError, DataError, PlanError and
# the settings checks are ValueErrors; OSError covers missing files, permissions and a full disk.
USER_ERRORS = (ValueError, OSError)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("JLORA_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    args = build_parser().parse_args(argv)
    if debug:
        return args.func(args)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"jlora {args.command}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        print(f"jlora {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a bug: say so in one line, --debug shows where
        print(f"jlora {args.command}: internal error: {type(e).__name__}: {one_line(e)} "
              f"(run again with --debug for the traceback)", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    """`jlora` and its subcommands (each parser a jlora.commands.help_format.Parser: defaults stated once)."""
    from jlora.commands.help_format import Parser, examples

    parser = Parser(prog="jlora", description="LoRA / QLoRA fine-tuning in JAX",
                    epilog="--debug (anywhere) shows tracebacks instead of one-line errors\n\n" + examples(
                        "jlora train            # the embedded demo: a tiny Llama on bundled data, ~1 min on a CPU",
                        "jlora <command> --help"))
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def one_line(e: BaseException) -> str:
    """The exception's message on one line: its first non-empty line (OSError: with the file name)."""
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.filename}: {e.strerror}"
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
