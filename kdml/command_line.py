"""The flags that every `python -m kdml.<command>` shares, declared once.

`SHARED_FLAGS` holds the name, type and help wording of `--model`, `--dataset`,
`--output_dir`, `--seed` and `--verbosity`; the absl commands (`kdml.train`,
`kdml.evaluate`, `kdml.export`) and the argparse ones (`kdml.index`, `kdml.benchmark`)
build those flags from it, so the names, types and wording cannot drift. A command
may add one sentence of its own (`note`: what its files are, its default) after the
shared wording.

Every command that writes files takes `--output_dir`. A flag spelled the way another
command (or an older kdml) spells it, such as `--output`, is a one-line error naming
the right flag (`check_flag_spellings`), not an "unknown flag" trace.

Importing this module imports neither absl nor TensorFlow (`kdml.config` reads it).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Iterable, Mapping, Optional, Sequence

from kdml.quiet_startup import quiet_logs


@dataclasses.dataclass(frozen=True)
class SharedFlag:
    """One shared flag: its value type (`str` or `int`) and its help wording."""

    type: type
    help: str


SHARED_FLAGS = {
    "model": SharedFlag(str, "The embedder to read (e.g. runs/default/embedder.keras)."),
    "dataset": SharedFlag(str, "synthetic (embedded glyphs) | folder:<dir> | "
                               "tfds:<cub200|cars196|sop|omniglot>."),
    "output_dir": SharedFlag(str, "Directory the command writes its files to."),
    "seed": SharedFlag(int, "Random seed."),
    # absl's own flag (absl.logging), which the argparse commands take as well.
    "verbosity": SharedFlag(int, ""),
}

# Spellings of other commands (or of older kdml versions) -> the flag to use instead.
# A command that has a flag of that name keeps it (`check_flag_spellings`).
RENAMED_FLAGS = {
    "output": "output_dir",
    "out_dir": "output_dir",
    "outdir": "output_dir",
    "output_directory": "output_dir",
    "model_path": "model",
    "random_seed": "seed",
}


def shared_help(name: str, note: str = "") -> str:
    """The help text of shared flag `name`: the shared wording, then `note` (if any)."""
    if name == "verbosity":
        from absl import flags, logging  # noqa: F401  (logging defines --verbosity)

        return flags.FLAGS["verbosity"].help
    return f"{SHARED_FLAGS[name].help} {note}".strip()


def define_flag(name: str, default=None, note: str = "", *, required: bool = False,
                flag_values=None) -> None:
    """Defines shared flag `--<name>` for an absl command (`kdml.evaluate`, `kdml.export`)."""
    from absl import flags

    flags.disclaim_key_flags()  # the flag belongs to the command calling this (its --help)
    define = {str: flags.DEFINE_string, int: flags.DEFINE_integer}[SHARED_FLAGS[name].type]
    define(name, default, shared_help(name, note), required=required,
           flag_values=flags.FLAGS if flag_values is None else flag_values)


def add_argument(parser, name: str, default=None, note: str = "", *,
                 required: bool = False) -> None:
    """Adds shared flag `--<name>` to an argparse (sub)parser (`kdml.index`, `kdml.benchmark`).

    `verbosity` is absl's flag (`-v` / `--verbosity`, an int; `set_verbosity`).
    """
    flag = SHARED_FLAGS[name]
    names = ("-v", "--verbosity") if name == "verbosity" else (f"--{name}",)
    parser.add_argument(*names, type=flag.type, default=default, required=required,
                        help=shared_help(name, note))


def set_verbosity(verbosity: Optional[int]) -> None:
    """absl's logging level from an argparse command's `--verbosity`; None: warnings and
    errors only (and `kdml.quiet_startup.quiet_logs`)."""
    from absl import logging

    logging.set_verbosity(logging.WARNING if verbosity is None else verbosity)
    if verbosity is None:
        quiet_logs()


def _flag_names(argv: Sequence[str]) -> Iterable[tuple]:
    """(argument, flag name) of each `--name[=value]` / `-name` argument before `--`."""
    for arg in argv:
        if arg == "--":
            return
        if arg.startswith("-") and len(arg) > 1 and not arg[1:2].isdigit():
            yield arg, arg.lstrip("-").split("=", 1)[0]


def check_flag_spellings(argv: Sequence[str], known: Iterable[str], prog: str,
                         renamed: Optional[Mapping[str, str]] = None) -> None:
    """Exits with a one-line `error:` (code 2) when `argv` holds a flag that this command
    (flags `known`) spells differently (`RENAMED_FLAGS`, plus `renamed`)."""
    known = set(known)
    table = {**RENAMED_FLAGS, **(renamed or {})}
    for arg, name in _flag_names(argv):
        if name in known or name not in table:
            continue
        right = table[name]
        right = right if right.startswith("-") else f"--{right}"
        print(f"error: {arg.split('=', 1)[0]} is not a flag of {prog}: use {right}.",
              file=sys.stderr)
        sys.exit(2)


HELP_FLAGS = ("help", "helpfull", "helpshort", "helpxml", "?")


def absl_flags_parser(prog: str, renamed: Optional[Mapping[str, str]] = None):
    """`app.run(main, flags_parser=...)`: absl's parsing after `check_flag_spellings`."""
    from absl import flags

    def parse(argv):
        check_flag_spellings(argv[1:], flags.FLAGS, prog, renamed)
        try:
            return flags.FLAGS(argv)
        except flags.Error as error:  # absl: 2 lines and exit 1; argparse's way: 1 line, 2
            print(f"error: {error} (flags: {prog} --helpfull)", file=sys.stderr)
            sys.exit(2)
        except SystemExit as stop:  # absl exits 1 after --help / --helpfull: asked, so 0
            if stop.code == 1 and any(name in HELP_FLAGS for _, name in _flag_names(argv[1:])):
                sys.exit(0)
            raise

    return parse


def argparse_flag_names(parser, argv: Sequence[str]) -> set:
    """The flag names (without dashes) of `parser`, and of the subcommand `argv` names."""
    import argparse

    names = {s.lstrip("-") for a in parser._actions for s in a.option_strings}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            command = next((a for a in argv if not a.startswith("-")), None)
            if command in action.choices:
                names |= argparse_flag_names(action.choices[command], [])
    return names
