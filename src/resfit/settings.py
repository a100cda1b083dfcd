"""Settings declared once: a config dataclass's field carries its flag, and the CLI is generated from it.

``setting(default, help=..., choices=...)`` is a ``dataclasses.field`` whose metadata holds the flag's help
text, choices and parser; ``add_flags(parser, Config)`` turns every such field into an argparse option, and
``check_choices(config)`` refuses a value outside a field's choices for Python-API callers too. The help
text, the choices and the default thus live beside the field they describe, not in a second list that can
drift from it (as ``--reject-score``'s choices once did, leaving out the default).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass

from .errors import ConfigError

FLAG = "flag"  # the metadata key of a field's Flag


@dataclass(frozen=True)
class Flag:
    """How one config field appears on the command line."""

    help: str | None = None
    choices: tuple | None = None
    parse: Callable[[str], object] | None = None  # default: from the field's type (int, float or str)
    metavar: str | None = None
    names: tuple[str, ...] = ()  # default: --field-name
    negate: str | None = None  # a True-by-default bool: this flag turns it off (--no-...)
    const: object = None  # given: the option may be given bare (nargs="?") and then means this value
    nargs: str | None = None  # "+": the option takes one or more values (a list field)


def setting(
    default=MISSING,
    *,
    help: str | None = None,
    choices: Iterable | None = None,
    parse: Callable[[str], object] | None = None,
    metavar: str | None = None,
    names: Iterable[str] = (),
    negate: str | None = None,
    const: object = None,
    nargs: str | None = None,
    default_factory=MISSING,
):
    """A dataclass field with its command-line flag."""
    flag = Flag(
        help=help,
        choices=tuple(choices) if choices is not None else None,
        parse=parse,
        metavar=metavar,
        names=tuple(names),
        negate=negate,
        const=const,
        nargs=nargs,
    )
    return dataclasses.field(default=default, default_factory=default_factory, metadata={FLAG: flag})


def flag_of(field: dataclasses.Field) -> Flag | None:
    return field.metadata.get(FLAG)


def option_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _field_default(field: dataclasses.Field):
    if field.default_factory is not MISSING:
        return field.default_factory()
    return None if field.default is MISSING else field.default


def _parser_for(cls: type, field: dataclasses.Field) -> Callable[[str], object] | None:
    """int or float from the field's annotation (``int | None`` included); anything else stays a string."""
    hint = typing.get_type_hints(cls)[field.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        kinds = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        hint = kinds[0] if len(kinds) == 1 else str
    return hint if hint in (int, float) else None


def add_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    only: Iterable[str] | None = None,
    skip: Iterable[str] = (),
    help_for: Mapping[str, str] | None = None,
) -> list[str]:
    """Add an option for each field of ``cls`` that declares a flag; returns the field names added.

    ``only``/``skip`` pick fields; ``help_for`` replaces a field's help where one command means it differently
    (compare's --weights takes ARCH=FILE pairs). The option's dest is the field name, so
    ``vars(args)`` feeds the dataclass directly.
    """
    wanted, skipped, help_for = (set(only) if only is not None else None), set(skip), dict(help_for or {})
    added = []
    for field in dataclasses.fields(cls):
        flag = flag_of(field)
        if flag is None or field.name in skipped or (wanted is not None and field.name not in wanted):
            continue
        text = help_for.get(field.name, flag.help)
        default = _field_default(field)
        if isinstance(default, bool):
            if default and not flag.negate:
                raise TypeError(
                    f"{cls.__name__}.{field.name} is True by default: give its flag a negate name"
                )
            names = (flag.negate,) if default else (flag.names or (option_name(field.name),))
            parser.add_argument(
                *names, dest=field.name, action="store_false" if default else "store_true", help=text
            )
        else:
            options = {
                "dest": field.name,
                "default": default,
                "help": text,
                "choices": flag.choices,
                "metavar": flag.metavar,
                "type": flag.parse or _parser_for(cls, field),
            }
            if flag.const is not None:
                options |= {"nargs": "?", "const": flag.const}
            elif flag.nargs is not None:
                options["nargs"] = flag.nargs
            parser.add_argument(*(flag.names or (option_name(field.name),)), **options)
        added.append(field.name)
    if wanted is not None and wanted - set(added):
        raise TypeError(f"{cls.__name__} has no flags for {sorted(wanted - set(added))}")
    return added


def from_args(cls: type, args: argparse.Namespace | Mapping, *, skip: Iterable[str] = (), **given):
    """The dataclass from parsed flags: the fields ``args`` holds (minus ``skip``), then ``given``."""
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    names = {f.name for f in dataclasses.fields(cls)} - set(skip)
    return cls(**({k: v for k, v in values.items() if k in names} | given))


def check_choices(config) -> None:
    """Refuse a field value outside its flag's choices, whoever built the config (CLI or Python)."""
    for field in dataclasses.fields(config):
        flag = flag_of(field)
        value = getattr(config, field.name)
        if flag is not None and flag.choices is not None and value is not None and value not in flag.choices:
            raise ConfigError(f"{field.name.replace('_', '-')} must be one of {flag.choices}, got {value!r}")


def int_list(text: str) -> list[int]:
    """A flag's value as comma-separated integers (``--train-sizes 96,112,128``)."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def comma_list(text: str) -> list[str]:
    """A flag's value as comma-separated names (``--models resnet50,resnet101``), blanks dropped."""
    return [part.strip() for part in text.split(",") if part.strip()]


def number_or_auto(text: str) -> float | str:
    """A flag's value as a number or the word auto (``--lr auto``)."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None
