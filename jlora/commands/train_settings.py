"""The train settings as CLI flags, one source for `jlora train` and `jlora sweep`.

Every `TrainConfig` field becomes a flag (`batch_size` -> `--batch-size`, bools as `--x/--no-x`) whose
parsed default is None, so "given on the command line" is known; the help states the default that runs,
and the demo's value where the embedded default (no --model, no --data) trains with another one.
"""
from __future__ import annotations

import argparse
import dataclasses

from jlora.train.config import DEMO_SETTINGS, GROUPS, HELP, TrainConfig, flag, with_demo_settings

_TYPES = {"int": int, "float": float, "str": str}
_BARE = {"remat": "full"}  # settings whose flag may be given without a value, and what it means then


def add_train_flags(parser: argparse.ArgumentParser, *, skip: tuple[str, ...] = (),
                    defaults: dict | None = None) -> None:
    """Adds `--config` and a flag per TrainConfig field (except `skip`), in the argument groups of
    jlora.train.config.GROUPS (a field in none goes under "other"); `defaults` overrides the stated ones."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    groups = {title: parser.add_argument_group(f"{title} settings" if title != "other" else "other")
              for title in GROUPS}
    if "other" not in groups:
        groups["other"] = parser.add_argument_group("other")
    where = {name: groups[title] for title, names in GROUPS.items() for name in names}
    groups["other"].add_argument("--config", metavar="YAML",
                                 help="YAML file of settings (TrainConfig field names); flags given here override it")
    order = [n for names in GROUPS.values() for n in names if n in fields]
    for name in order + [n for n in fields if n not in order]:
        f = fields[name]
        if f.name in skip:
            continue
        group = where.get(f.name, groups["other"])
        default = (defaults or {}).get(f.name, f.default)
        text = f"{HELP.get(f.name, '')} (default {_show(default)}"
        if f.name in DEMO_SETTINGS and DEMO_SETTINGS[f.name] != default:
            text += f"; the demo without --model: {_show(DEMO_SETTINGS[f.name])}"
        text = (text + ")").replace("%", "%%")
        kind = str(f.type).split("|")[0].strip()
        if kind == "bool":
            group.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=text)
        elif f.name in _BARE:  # `--remat` alone keeps its old meaning (full)
            group.add_argument(flag(f.name), nargs="?", const=_BARE[f.name], default=None, help=text,
                                metavar=f.name.upper())
        else:
            group.add_argument(flag(f.name), type=_TYPES.get(kind, str), default=None, help=text,
                                metavar=f.name.upper())


def settings_from_args(args: argparse.Namespace, *, skip: tuple[str, ...] = (),
                       defaults: dict | None = None, demo: bool = True) -> tuple[TrainConfig, set[str]]:
    """(TrainConfig, names the user chose) from `--config` then the flags given; `defaults` apply to what
    neither sets; with `demo`, the embedded default's settings apply where nothing was chosen.
    Raises ConfigError (a ValueError) naming the flag or the file."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names and k not in skip and v is not None}
    from_file = TrainConfig.read_yaml(args.config) if getattr(args, "config", None) else {}
    chosen = set(from_file) | set(given)
    settings = {**{k: v for k, v in (defaults or {}).items() if k not in chosen}, **from_file, **given}
    config = TrainConfig(**settings)
    if demo:
        config = with_demo_settings(config, chosen)
    return config, chosen


def demo_note(config: TrainConfig, chosen: set[str]) -> str | None:
    """The line saying which settings the embedded default's demo changed, or None when none applies."""
    if config.model is not None or config.data is not None:
        return None
    changed = [f"{k}={_show(v)}" for k, v in DEMO_SETTINGS.items() if k not in chosen]
    return ("no --model: the embedded default (tiny Llama, bundled data) with the demo's settings "
            f"{' '.join(changed)} (any flag overrides them)") if changed else None


def _show(value) -> str:
    return "unset" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
