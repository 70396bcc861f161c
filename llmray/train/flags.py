"""One way of turning a config dataclass into CLI flags: every field a flag, its default in the help.

``add_dataclass_flags(parser, Config, ...)`` adds ``--field-name`` for every field of ``Config`` (a nested
dataclass field ``lora: LoraConfig`` becomes ``--lora-r``, ``--lora-alpha``, ...); ``build_dataclass``
turns the parsed namespace back into ``Config``. Types come from the annotations: ``bool`` fields get
``--x/--no-x``, ``int``/``float`` fields a typed value, ``X | None`` fields default to ``None`` (their help
says what ``None`` means). A field added to the dataclass is a flag without touching the CLI.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any


def _base_type(annotation: Any) -> type:
    """``int | None`` -> int, ``str | list[str]`` -> str, ``bool`` -> bool."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        simple = [a for a in args if a in (bool, int, float, str)]
        return simple[0] if simple else str
    return annotation if annotation in (bool, int, float, str) else str


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def flag_name(dest: str, rename: dict[str, str] | None = None) -> str:
    """``lora_r`` -> ``--lora-r`` (or its entry in ``rename``)."""
    return "--" + (rename or {}).get(dest, dest).replace("_", "-")


def add_dataclass_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    helps: dict[str, str] | None = None,
    choices: dict[str, tuple[str, ...]] | None = None,
    required: tuple[str, ...] = (),
    hidden: tuple[str, ...] = (),
    none_means: dict[str, str] | None = None,
    rename: dict[str, str] | None = None,
    prefix: str = "",
) -> None:
    """Add one flag per field of ``cls`` (recursing into dataclass fields with ``<field>_`` as prefix).

    Keys of ``helps``/``choices``/``none_means``/``rename`` and names in ``required``/``hidden`` are
    flattened destinations (``lora_r``). ``required`` fields have no default; ``hidden`` ones are
    accepted but left out of ``--help`` (test hooks).
    """
    helps, choices, none_means = helps or {}, choices or {}, none_means or {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        dest = prefix + f.name
        default = _default(f)
        if dataclasses.is_dataclass(hints[f.name]):
            add_dataclass_flags(
                parser, hints[f.name], helps=helps, choices=choices, required=required, hidden=hidden,
                none_means=none_means, rename=rename, prefix=dest + "_",
            )  # fmt: skip
            continue
        kind = _base_type(hints[f.name])
        text = helps.get(dest, "")
        if dest in required or default is dataclasses.MISSING:
            shown = "required"
            default = None
        elif default is None:
            shown = f"default: {none_means.get(dest, 'none')}"
        elif isinstance(default, list):
            shown = f"default: {','.join(map(str, default))}"
        else:
            shown = f"default: {default}"
        help_text = f"{text} ({shown})" if text else f"({shown})"
        help_text = (
            argparse.SUPPRESS if dest in hidden else help_text.replace("%", "%%")
        )  # argparse %-formats
        kwargs: dict[str, Any] = dict(dest=dest, default=default, help=help_text)
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.update(type=kind, choices=choices.get(dest))
            kwargs["metavar"] = None if dest in choices else dest.upper()
        if dest in required:
            kwargs["required"] = True
        parser.add_argument(flag_name(dest, rename), **kwargs)


def build_dataclass(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """The ``cls`` instance for flattened ``values`` (a parsed namespace's ``vars``); extra keys ignored."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        dest = prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = build_dataclass(hints[f.name], values, prefix=dest + "_")
        elif dest in values:
            kwargs[f.name] = values[dest]
    return cls(**kwargs)
