"""Configuration as data: frozen dataclasses that drive the CLI and the JSON records.

One function turns a config dataclass (nested ones included) into
``argparse`` flags (:func:`add_config_flags`) and one reads them back
(:func:`apply_flags`). A field's metadata gives its ``help`` and, where the
values are a fixed set, its ``choices`` (a tuple, or a function returning
one for registries that can grow); ``"cli": False`` keeps it off the command
line. A nested dataclass's fields appear without its name (``--fraction``,
not ``--search-fraction``).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

from ..errors import ConfigError

__all__ = ["add_config_flags", "apply_flags", "config_leaves", "config_record", "given_flags"]


def config_leaves(config: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], dataclasses.Field, Any]]:
    """``(path, field, value)`` for every CLI field of a config instance, nested dataclasses flattened."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            yield from config_leaves(value, (*path, f.name))
        elif f.metadata.get("cli", True):
            yield (*path, f.name), f, value


def config_record(config: Any) -> Any:
    """A JSON-friendly dict of a config (nested), using a config's own ``to_dict`` where it has one."""
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: config_record(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, tuple):
        return list(config)
    return config


def _flag(name: str, prefix: str) -> str:
    return "--" + (f"{prefix}-" if prefix else "") + name.replace("_", "-")


def _converter(field: dataclasses.Field, example: Any, flag: str):
    """``argparse`` keywords reading one field's value from text."""
    choices = field.metadata.get("choices")
    if callable(choices):
        choices = choices()
    if isinstance(example, bool):
        return {"action": argparse.BooleanOptionalAction}
    if isinstance(example, tuple) or (example is None and "tuple" in str(field.type)):
        return {"type": lambda text: tuple(part.strip() for part in text.split(",") if part.strip()), "metavar": "A,B,..."}
    kind = type(example) if example is not None and not callable(example) else str
    if example is None and str(field.type).startswith("int"):
        kind = int
    if example is None and str(field.type).startswith("float"):
        kind = float
    if kind is int and "float" in str(field.type):
        kind = float

    def convert(text: str):
        try:
            return kind(text)
        except ValueError:
            article = "an" if kind.__name__[0] in "aeiou" else "a"
            raise argparse.ArgumentTypeError(f"{flag} expects {article} {kind.__name__}, got {text!r}") from None

    convert.__name__ = kind.__name__
    keywords: dict[str, Any] = {"type": convert}
    if choices:
        keywords["choices"] = tuple(choices)
    return keywords


def add_config_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    presets: Mapping[str, Any],
    *,
    prefix: str = "",
    dest: str = "",
    skip: tuple[str, ...] = (),
    hidden: bool = False,
) -> None:
    """One flag per leaf field of the config instances in ``presets`` (``{method name: config}``).

    A field several presets share becomes one flag; its help shows each
    preset's default (``[bingo: zero, bingo-paper: reset]``). Every flag
    defaults to None, so :func:`apply_flags` knows what was given. Flags are
    ``--<prefix>-<field>`` with a prefix, ``--<field>`` without; the
    ``argparse`` destination is ``<dest>__<field>`` (``dest`` defaults to the prefix).
    ``hidden``: the flags work but are left out of ``--help``. A preset of
    None shows as ``none`` (what it means is the help text's).
    """
    dest = dest or prefix
    seen: dict[str, tuple[dataclasses.Field, Any]] = {}
    defaults: dict[str, dict[str, str]] = {}
    for method, config in presets.items():
        for path, f, value in config_leaves(config):
            if f.name in skip:
                continue
            seen.setdefault(f.name, (f, value))
            shown = getattr(value, "__name__", value) if callable(value) else value
            defaults.setdefault(f.name, {})[method] = "none" if shown is None else str(shown)
    for name, (f, example) in seen.items():
        flag = _flag(name, prefix)
        keywords = _converter(f, example, flag)
        if "choices" not in keywords and "action" not in keywords:
            keywords.setdefault("metavar", name.upper())
        by_method = defaults[name]
        shown = next(iter(by_method.values())) if len(set(by_method.values())) == 1 else ", ".join(f"{m}: {v}" for m, v in by_method.items())
        text = argparse.SUPPRESS if hidden else f"{f.metadata.get('help', '')} [{shown}]".replace("%", "%%")
        parser.add_argument(flag, dest=f"{dest}__{name}", default=None, help=text, **keywords)


def _given(args: argparse.Namespace, prefix: str) -> dict[str, Any]:
    start = f"{prefix}__"
    return {k[len(start):]: v for k, v in vars(args).items() if k.startswith(start) and v is not None}


def given_flags(args: argparse.Namespace, *, prefix: str = "", dest: str = "") -> list[str]:
    """The flags of one :func:`add_config_flags` group that the command line gave, as the user typed them (``--gmp-frequency``)."""
    return [_flag(name, prefix) for name in _given(args, dest or prefix)]


def apply_flags(args: argparse.Namespace, config: Any, *, prefix: str = "", dest: str = "", method: str = "") -> Any:
    """``config`` with the values of the flags given on the command line (from :func:`add_config_flags`).

    A flag that ``config`` has no field for raises :class:`ConfigError`
    naming the method.
    """
    given = _given(args, dest or prefix)
    leaves = {path[-1]: path for path, _, _ in config_leaves(config)}
    unknown = [name for name in given if name not in leaves]
    if unknown:
        names = ", ".join(_flag(name, prefix) for name in unknown)
        raise ConfigError(f"{names} does not apply to method {method or type(config).__name__!r}; its settings: "
                          + ", ".join(_flag(n, prefix) for n in leaves))
    return _replace(config, {leaves[name]: value for name, value in given.items()})


def _replace(config: Any, values: dict[tuple[str, ...], Any]) -> Any:
    direct = {path[0]: value for path, value in values.items() if len(path) == 1}
    nested: dict[str, dict[tuple[str, ...], Any]] = {}
    for path, value in values.items():
        if len(path) > 1:
            nested.setdefault(path[0], {})[path[1:]] = value
    for name, inner in nested.items():
        direct[name] = _replace(getattr(config, name), inner)
    return dataclasses.replace(config, **direct) if direct else config
