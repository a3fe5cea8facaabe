"""How `jlora <command> --help` reads: every flag's default stated once, examples kept as written.

`HelpFormatter` appends ` (default X)` to a flag's help when the flag has a default worth saying (not unset,
not an off switch) and the help does not already say one ("(default ..."), so a default is never stated twice (argparse's
ArgumentDefaultsHelpFormatter adds "(default: None)" even after a hand-written "(default: ...)"). In a
description or epilog, lines that start with spaces (examples) are kept as written; other lines are wrapped.
Every subcommand's parser is a `Parser`, which uses this formatter unless told otherwise.
"""
from __future__ import annotations

import argparse


def states_default(action: argparse.Action) -> bool:
    """Whether the flag has a default a user should be told: set, not False (an off switch), not hidden."""
    return (bool(action.option_strings) and action.default is not None and action.default is not False
            and action.default is not argparse.SUPPRESS)


class HelpFormatter(argparse.HelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if states_default(action) and "(default" not in text.lower():
            text += " (default %(default)s)"
        return text

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        lines = []
        for line in text.splitlines():
            if not line.strip() or line.startswith(" "):
                lines.append(indent + line if line.strip() else "")
            else:
                lines.append(super()._fill_text(line, width, indent))
        return "\n".join(lines)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose help uses HelpFormatter (the subcommands' parser class)."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


def examples(*lines: str) -> str:
    """An epilog of example command lines, each kept on its own line."""
    return "examples:\n" + "\n".join("  " + line for line in lines)
