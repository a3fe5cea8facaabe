"""`jlora <command> --help` explains itself: every flag of every subcommand has help, states its default at most
once (never "(default X) (default: None)"), each subcommand shows an example; `jlora train --help` lists its
flags in the groups of jlora.train.config.GROUPS, which place every TrainConfig field exactly once."""
import argparse
import dataclasses
import re

import pytest

from jlora.cli import COMMANDS, build_parser, main
from jlora.commands.help_format import states_default
from jlora.train.config import GROUPS, HELP, TrainConfig, flag

SUBCOMMANDS = [name.rsplit(".", 1)[1] for name in COMMANDS]


def subparsers() -> dict[str, argparse.ArgumentParser]:
    [action] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_subcommand_is_checked():
    assert set(subparsers()) == set(SUBCOMMANDS) >= {"train", "plan", "export", "generate", "chat", "inspect",
                                                     "ranks", "sweep"}


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_flag_has_help_with_its_default_once(command):
    parser = subparsers()[command]
    formatter = parser._get_formatter()
    problems = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        if not action.help or action.help is argparse.SUPPRESS or not action.help.strip():
            problems.append(f"{name}: no help")
            continue
        text = formatter._expand_help(action)  # what --help prints, the formatter's default note included
        stated = len(re.findall(r"\(default\b", text, flags=re.IGNORECASE))
        if stated > 1 or "(default: None)" in text:
            problems.append(f"{name}: default stated {stated} times: {text!r}")
        if states_default(action) and not stated:
            problems.append(f"{name}: default {action.default!r} not stated: {text!r}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit:
        main([command, "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    examples = out.split("\nexamples:\n", 1)[-1] if "\nexamples:\n" in out else ""
    assert re.search(rf"^  (.*\| )?jlora {command}\b", examples, flags=re.MULTILINE), out[-600:]
    assert "(default: None)" not in out


def test_every_train_setting_has_help_and_one_group():
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    placed = [name for names in GROUPS.values() for name in names]
    assert sorted(set(placed)) == sorted(placed), "a field in two groups"
    missing = [f for f in fields if f not in placed]
    assert not missing, (f"TrainConfig fields in no help group: {missing}; add each to a GROUPS entry in "
                         "jlora/train/config.py (next to HELP)")
    assert not set(placed) - set(fields), f"GROUPS names fields TrainConfig lacks: {set(placed) - set(fields)}"
    assert not [f for f in fields if not HELP.get(f, "").strip()], "a field without a HELP line"


def test_train_help_lists_flags_by_group():
    parser = subparsers()["train"]
    titles = {g.title: [a for a in g._group_actions] for g in parser._action_groups}
    for title, names in GROUPS.items():
        heading = f"{title} settings" if title != "other" else "other"
        flags_there = {s for a in titles[heading] for s in a.option_strings}
        assert {flag(n) for n in names} <= flags_there, (title, {flag(n) for n in names} - flags_there)
    text = parser.format_help()
    order = [text.index(f"\n{t} settings:\n" if t != "other" else "\nother:\n") for t in GROUPS]
    assert order == sorted(order)  # printed in GROUPS' order
