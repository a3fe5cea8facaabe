"""`jlora` command line. Each subcommand lives in `jlora/commands/<name>.py` and is listed here."""
from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules, in the order `jlora --help` lists them.
COMMANDS = [
    "jlora.commands.train",
    "jlora.commands.plan",
    "jlora.commands.ranks",
    "jlora.commands.sweep",
    "jlora.commands.inspect",
    "jlora.commands.export",
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jlora", description="LoRA / QLoRA fine-tuning in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
