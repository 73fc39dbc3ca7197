"""User-facing errors.

Every problem caused by the caller's input (an unknown name, a value out of
range, a missing or corrupt file) raises a subclass of :class:`BingoError`.
Its message is one line that names the problem and, where there is a fixed
set, the valid choices. The CLI turns these into ``bingo: error: ...`` and
exit code 2; library users can catch them as ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["BingoError", "ConfigError", "DataError", "CheckpointError", "TrainingError", "check_choice"]


class BingoError(ValueError):
    """Base class of every error caused by bad input."""


class ConfigError(BingoError):
    """An argument or option has an invalid value."""


class DataError(BingoError):
    """A dataset is missing, unreadable or inconsistent."""


class CheckpointError(BingoError):
    """A checkpoint or state dict does not fit what it is loaded into."""


class TrainingError(BingoError):
    """Training diverged (a loss or weight that is not finite, or a loss exploded) under the given settings."""


def check_choice(what: str, value: object, choices: Iterable[object]) -> None:
    """Raise :class:`ConfigError` unless ``value`` is one of ``choices``.

    The message lists the valid choices, e.g.
    ``unknown mode 'foo'; valid choices: reset, zero``.
    """
    choices = list(choices)
    if value not in choices:
        valid = ", ".join(str(c) for c in choices)
        raise ConfigError(f"unknown {what} {value!r}; valid choices: {valid}")
