"""`python -m kdml.train`: absl flags -> `TrainConfig` -> `kdml.training.train`.

Example:
    python -m kdml.train --method=proxy_anchor --dataset=synthetic --epochs=20
    python -m kdml.train --dataset=tfds:cub200 --download --backbone=resnet50
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from absl import app, flags, logging  # noqa: E402

from kdml import command_line  # noqa: E402
from kdml.config import TrainConfig, is_flag  # noqa: E402
from kdml.methods import check_method_options, get_method
from kdml.quiet_startup import quiet_logs
from kdml.training import train

# (The docstring above is the --help text.) Every flag is generated from a field of
# `kdml.config.TrainConfig` (`define_flags`): a new setting is declared once, there.
# `--verbosity=0` (absl's) shows TensorFlow's start-up logs and kdml's info logs,
# which are hidden by default (kdml.quiet_startup).
FLAGS = flags.FLAGS
# `--freeze_batchnorm`-style flags of Optional[bool] settings: None is "auto".
_TRISTATE = {"auto": None, "true": True, "false": False}


def define_flags(config_class=TrainConfig, flag_values=FLAGS) -> None:
    """Defines one absl flag per setting of `config_class` (`kdml.config.setting`).

    The annotation picks the flag type: bool -> DEFINE_bool, int / float -> integer /
    float, str with `choices` -> enum, Tuple[int, ...] -> a comma-separated list,
    Optional[bool] -> enum auto|true|false. Optional settings default to None.
    """
    types = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        if not is_flag(field):
            continue
        kind, default = _flag_kind(types[field.name]), field.default
        help_text, choices = field.metadata["help"], field.metadata.get("choices")
        args = dict(flag_values=flag_values)
        if kind is bool:
            flags.DEFINE_bool(field.name, default, help_text, **args)
        elif kind == "tristate":
            default = next(k for k, v in _TRISTATE.items() if v is default)
            flags.DEFINE_enum(field.name, default, list(_TRISTATE), help_text, **args)
        elif choices:
            flags.DEFINE_enum(field.name, default, list(choices), help_text, **args)
        elif kind is int:
            flags.DEFINE_integer(field.name, default, help_text, **args)
        elif kind is float:
            flags.DEFINE_float(field.name, default, help_text, **args)
        elif kind == "int_list":
            flags.DEFINE_list(field.name, [str(k) for k in default], help_text, **args)
        else:
            flags.DEFINE_string(field.name, default, help_text, **args)


def _flag_kind(annotation):
    """bool | int | float | str | "tristate" (Optional[bool]) | "int_list" (Tuple[int, ...])."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Union:  # Optional[X]
        (inner,) = args
        return "tristate" if inner is bool else _flag_kind(inner)
    if typing.get_origin(annotation) is tuple:
        if args[:1] != [int]:
            raise TypeError(f"Only Tuple[int, ...] settings are flags. Received: {annotation}")
        return "int_list"
    return annotation


def config_from_flags(values=FLAGS) -> TrainConfig:
    """The frozen `TrainConfig` of parsed flags; nothing below this reads flags."""
    types = typing.get_type_hints(TrainConfig)
    settings = {}
    for field in dataclasses.fields(TrainConfig):
        if not is_flag(field):
            continue
        value, kind = getattr(values, field.name), _flag_kind(types[field.name])
        if kind == "tristate":
            value = _TRISTATE[value]
        elif kind == "int_list":
            try:
                value = tuple(int(k) for k in value)
            except ValueError:
                raise ValueError(f"--{field.name} must be comma-separated integers, e.g. "
                                 f"--{field.name}=1,2,4. Received: {','.join(value)!r}") from None
        settings[field.name] = value
    return TrainConfig(**settings)


define_flags()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")

    # Without --verbosity, Python logs show warnings and errors only; the run itself
    # prints what it does (kdml.training.run). --verbosity=0 adds info, 1 debug.
    previous = logging.get_verbosity()
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
        quiet_logs()  # a quiet command: warnings as plain `warning: ...` lines
    try:
        config = config_from_flags()
        get_method(config.method)  # fail fast, before any data is loaded
        check_method_options(config)
        train(config)
    except (ValueError, FileNotFoundError, FloatingPointError) as error:
        logging.debug("Traceback of the error below:", exc_info=True)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    finally:
        logging.set_verbosity(previous)


if __name__ == "__main__":
    app.run(main, flags_parser=command_line.absl_flags_parser("python -m kdml.train"))
