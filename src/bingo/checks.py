"""Argument checks shared by the public entry points: one-line :class:`~bingo.errors.ConfigError` s.

Each check names the argument, what was given and what is expected, so that
a wrong type (a string for a model, a list for a score tensor) or a model
that cannot run (weights on the meta device) never reaches torch as an
``AttributeError`` or a raw ``RuntimeError``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from collections.abc import Mapping

import torch
from torch import nn

from .errors import ConfigError

__all__ = [
    "META_DEVICE", "check_field_types", "check_fraction", "check_model", "check_names", "check_positive_int", "check_scores",
    "check_judgement", "check_seed", "check_state_dict", "describe",
]

#: what to do about a model on the meta device (``torch.device("meta")``: shapes without data)
META_DEVICE = ("is on the meta device: materialise its weights first "
               "(e.g. model.to_empty(device=...) and load a state_dict)")


def describe(value: object) -> str:
    """A short description of ``value`` for an error: its type, and its repr when that is short."""
    if value is None:
        return "None"
    text = repr(value)
    kind = type(value).__name__
    return f"{kind} {text}" if len(text) <= 40 and not isinstance(value, (torch.Tensor, nn.Module)) else kind


def check_model(where: str, model: object, name: str = "model", *, meta: bool = True) -> nn.Module:
    """``model`` if it is an ``nn.Module`` with data, else :class:`ConfigError` naming ``where`` and ``name``.

    With ``meta`` (default), a model with a parameter or buffer on the meta
    device is refused too (:data:`META_DEVICE`): it has shapes but no values.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{where}: {name} must be a torch.nn.Module, got {describe(model)}")
    if meta and any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise ConfigError(f"{where}: {name} {META_DEVICE}")
    return model


def check_scores(where: str, scores: object, name: str = "scores") -> dict[str, torch.Tensor]:
    """``scores`` if it is a mapping ``{str: tensor}``, else :class:`ConfigError` naming the first bad entry."""
    if not isinstance(scores, Mapping):
        raise ConfigError(f"{where}: {name} must be a dict {{key: tensor}} (e.g. from bingo.magnitude_scores(model)), "
                          f"got {describe(scores)}")
    for key, value in scores.items():
        if not isinstance(key, str):
            raise ConfigError(f"{where}: {name} keys must be parameter names (str, e.g. 'fc1.weight'), got {describe(key)}")
        if not isinstance(value, torch.Tensor):
            raise ConfigError(f"{where}: {name}[{key!r}] must be a torch.Tensor, got {describe(value)}")
        if value.is_meta:
            raise ConfigError(f"{where}: {name}[{key!r}] is on the meta device (no values): compute the scores of a "
                              "model with real weights")
        if value.is_complex():
            raise ConfigError(f"{where}: {name}[{key!r}] is a {value.dtype} tensor; scores must be real numbers")
    return dict(scores)


def check_judgement(where: str, value: object, when: str = "") -> float:
    """``value`` (what a caller's ``evaluate(model)`` returned) as a finite float, else :class:`ConfigError` saying what it was."""
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: evaluate(model) must return a number (higher = better), got {describe(value)}") from None
    if not math.isfinite(score):
        raise ConfigError(f"{where}: evaluate(model) returned {score}{' ' + when if when else ''}; it must be a finite number")
    return score


def check_state_dict(where: str, state: object, name: str = "state_dict") -> Mapping:
    """``state`` if it is a mapping, else :class:`ConfigError` (what ``load_state_dict`` methods take)."""
    if not isinstance(state, Mapping):
        raise ConfigError(f"{where}: {name} must be a dict (as state_dict() returns), got {describe(state)}")
    return state


def check_positive_int(where: str, name: str, value: object) -> int:
    """``value`` as an int >= 1 (not a bool, not a float), else :class:`ConfigError`."""
    try:
        number = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        number = None
    if number is None or number < 1:
        raise ConfigError(f"{where}: {name} must be an integer >= 1, got {describe(value)}")
    return number


def check_fraction(where: str, name: str, value: object, *, closed: bool = False) -> float:
    """``value`` as a float in [0, 1) (``closed``: [0, 1]), else :class:`ConfigError`; NaN and non-numbers refused.

    ``where`` (the function, e.g. ``"compensate"``) prefixes the message; ``""`` leaves it out.
    """
    interval = "[0, 1]" if closed else "[0, 1)"
    prefix = f"{where}: " if where else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{prefix}{name} must be a fraction in {interval}, got {describe(value)}")
    number = float(value)
    if math.isnan(number) or not (0.0 <= number <= 1.0 if closed else 0.0 <= number < 1.0):
        raise ConfigError(f"{prefix}{name} must be a fraction in {interval}, got {value!r}")
    return number


#: the annotations :func:`check_field_types` checks, and what each admits
_KINDS = {
    # a number: whether it is whole (and in range) is each config's own check, with its own message
    "int": ("an integer", lambda v: isinstance(v, numbers.Real)),
    "float": ("a number", lambda v: isinstance(v, numbers.Real)),
    "str": ("a str", lambda v: isinstance(v, str)),
    "bool": ("True or False", lambda v: isinstance(v, bool)),
    "None": ("None", lambda v: v is None),
}


def check_field_types(config: object) -> None:
    """:class:`ConfigError` naming the first field of dataclass ``config`` whose value is not of its annotated kind.

    Checked are the fields annotated with ``int``, ``float``, ``str``,
    ``bool`` and ``None`` (and unions of them, ``int | None``); a bool is
    not a number here. Whether an int field's number is whole, and every
    value range, are each config's own ``__post_init__``'s to check.
    """
    for f in dataclasses.fields(config):
        annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        kinds = [part.strip() for part in annotation.split("|")]
        if not kinds or any(kind not in _KINDS for kind in kinds):
            continue  # a class, a callable, a tuple: the config checks those itself
        value = getattr(config, f.name)
        if isinstance(value, bool) and "bool" not in kinds:
            ok = False
        else:
            ok = any(_KINDS[kind][1](value) for kind in kinds)
        if not ok:
            expected = " or ".join(_KINDS[kind][0] for kind in kinds)
            raise ConfigError(f"{type(config).__name__}.{f.name} must be {expected}, got {describe(value)}")


#: what ``torch.Generator.manual_seed`` takes
SEED_RANGE = (-(2**63), 2**64 - 1)


def check_seed(where: str, name: str, value: object) -> int:
    """``value`` as an int seed (a whole number in :data:`SEED_RANGE`, not a bool), else :class:`ConfigError`."""
    try:
        number = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        number = None
    if number is None:
        raise ConfigError(f"{where}: {name} must be an integer, got {describe(value)}")
    if not SEED_RANGE[0] <= number <= SEED_RANGE[1]:
        raise ConfigError(f"{where}: {name} must be a whole number in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], got {number}")
    return number


def check_names(where: str, name: str, value: object, *, optional: bool = False) -> list[str] | None:
    """``value`` (an iterable of str: glob patterns, keys) as a list; a single str is one name. Else :class:`ConfigError`."""
    if value is None and optional:
        return None
    if isinstance(value, str):
        return [value]
    try:
        names = list(value)  # type: ignore[call-overload]
    except TypeError:
        names = None
    if names is None or isinstance(value, torch.Tensor) or any(not isinstance(n, str) for n in names):
        raise ConfigError(f"{where}: {name} must be a list of str (parameter names or glob patterns)"
                          f"{' or None' if optional else ''}, got {describe(value)}")
    return names


def check_shape(where: str, name: str, value: object) -> tuple[int, ...]:
    """``value`` as a per-sample shape: a non-empty sequence of whole numbers >= 1, else :class:`ConfigError`."""
    try:
        sizes = list(value)  # type: ignore[call-overload]
    except TypeError:
        sizes = None
    if (sizes is None or isinstance(value, (str, bytes)) or not sizes
            or any(isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1 for d in sizes)):
        raise ConfigError(f"{where}: {name} must be a shape such as (1, 28, 28): whole numbers >= 1, got {describe(value)}")
    return tuple(int(d) for d in sizes)
