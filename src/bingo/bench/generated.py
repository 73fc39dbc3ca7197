"""Tasks generated offline from a seed: benchmarks not derived from Fashion-MNIST or digits.

Each generator is a pure function of its arguments: the same ``seed`` gives
the same bytes (NumPy's PCG64 stream, computed in float64 and cast to
float32 at the end; elementwise, so bit-exact on every machine, except the
teacher's labels, which go through BLAS matrix products whose last bits may
differ between builds), a different seed a different task. Each
returns raw arrays ``(x_train, y_train, x_test, y_test, stored_shape)`` in
the layout :func:`bingo.bench.data.load_dataset` standardises, so a task is
a ``--data`` name like any other (:data:`GENERATED_TASKS`, seed
:data:`TASK_SEED`); labels are int64 class indices ``0 .. classes - 1``.

- ``teacher-student``: Gaussian inputs ``(features,)`` labelled by a fixed
  random ReLU "teacher" MLP much wider than the ``mlp`` student, so the
  student has little room to spare (dense accuracy well below 100%).
- ``tokens``: sequences of ``length`` one-hot tokens, ``(length, vocabulary)``;
  the class needs counting and order: which of 4 marker tokens is most
  frequent (ties to the lowest), times whether the first "order" token comes
  before the second. For the ``transformer`` model (each row a token).
- ``signals``: noisy 1-D signals ``(channels, length)`` with one of
  ``classes`` fixed ±1 motifs added at a random place; the class is the
  motif. For the ``conv1d`` model.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import ConfigError

__all__ = ["GENERATED_TASKS", "TASK_SEED", "generate", "signals", "teacher_student", "tokens"]

#: The seed of the tasks that ``--data teacher-student`` (etc.) loads: one fixed task per name.
TASK_SEED = 0

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[int, ...]]


def _check_sizes(task: str, **sizes: int) -> None:
    for name, value in sizes.items():
        least = 2 if name in ("classes", "vocabulary") else 1
        if isinstance(value, bool) or int(value) != value or value < least:
            raise ConfigError(f"{task}: {name} must be a whole number >= {least}, got {value!r}")


def _split(x: np.ndarray, y: np.ndarray, train: int) -> Arrays:
    return x[:train], y[:train], x[train:], y[train:], tuple(x.shape[1:])


def teacher_student(
    seed: int = TASK_SEED, *, train: int = 20000, test: int = 2000, features: int = 32, classes: int = 10,
    teacher_width: int = 256,
) -> Arrays:
    """Inputs ``N(0, I)`` of shape ``(features,)``, labels ``argmax`` of a random 2-hidden-layer ReLU teacher.

    The teacher is ``features → teacher_width → teacher_width → classes``
    with He-normal weights and no biases; its logits are centred per class
    (minus their mean over the generated inputs) so that no class dominates.
    """
    _check_sizes("teacher-student", train=train, test=test, features=features, classes=classes,
                 teacher_width=teacher_width)
    rng = np.random.default_rng(seed)
    shapes = ((features, teacher_width), (teacher_width, teacher_width), (teacher_width, classes))
    weights = [rng.standard_normal(shape) * np.sqrt(2.0 / shape[0]) for shape in shapes]
    x = rng.standard_normal((train + test, features))
    h = x
    for w in weights[:-1]:
        h = np.maximum(h @ w, 0.0)
    logits = h @ weights[-1]
    y = np.argmax(logits - logits.mean(axis=0), axis=1).astype(np.int64)
    return _split(x.astype(np.float32), y, train)


#: the marker tokens whose counts decide the first part of a ``tokens`` class
MARKERS = 4


def tokens(seed: int = TASK_SEED, *, train: int = 8000, test: int = 2000, length: int = 16, vocabulary: int = 16) -> Arrays:
    """One-hot token sequences ``(length, vocabulary)``; ``2 · MARKERS`` classes from counts and order.

    Tokens ``0 .. MARKERS-1`` are markers, ``MARKERS`` and ``MARKERS+1`` are
    the order tokens (each placed exactly once, at two distinct random
    positions), the rest is filler; every other position is drawn uniformly
    from the markers and the filler. Class ``= 2 · m + o``: ``m`` the most
    frequent marker (ties to the lowest index; ``0`` if none appears), ``o``
    1 if the first order token comes before the second.
    """
    _check_sizes("tokens", train=train, test=test, length=length, vocabulary=vocabulary)
    if vocabulary < MARKERS + 3 or length < 2:
        raise ConfigError(f"tokens: needs vocabulary >= {MARKERS + 3} and length >= 2, got {vocabulary} and {length}")
    rng = np.random.default_rng(seed)
    n = train + test
    free = np.concatenate([np.arange(MARKERS), np.arange(MARKERS + 2, vocabulary)])
    ids = free[rng.integers(len(free), size=(n, length))]
    positions = np.argsort(rng.random((n, length)), axis=1)[:, :2]  # two distinct places per sequence
    rows = np.arange(n)
    ids[rows, positions[:, 0]] = MARKERS
    ids[rows, positions[:, 1]] = MARKERS + 1
    counts = (ids[:, :, None] == np.arange(MARKERS)).sum(axis=1)
    majority = np.argmax(counts, axis=1)  # the first maximum: ties go to the lowest marker
    before = (positions[:, 0] < positions[:, 1]).astype(np.int64)
    y = (2 * majority + before).astype(np.int64)
    x = np.eye(vocabulary, dtype=np.float32)[ids]
    return _split(x, y, train)


def signals(
    seed: int = TASK_SEED, *, train: int = 6000, test: int = 2000, channels: int = 2, length: int = 64,
    classes: int = 6, motif: int = 7, amplitude: float = 1.0,
) -> Arrays:
    """Gaussian noise ``(channels, length)`` plus ``amplitude`` × one of ``classes`` ±1 motifs at a random place.

    The motifs (``classes × channels × motif``, signs of Gaussian draws) are
    fixed by the seed; the class of a sample is the motif added to it.
    """
    _check_sizes("signals", train=train, test=test, channels=channels, length=length, classes=classes, motif=motif)
    if motif > length:
        raise ConfigError(f"signals: motif ({motif}) must not be longer than the signal ({length})")
    rng = np.random.default_rng(seed)
    n = train + test
    motifs = np.sign(rng.standard_normal((classes, channels, motif)))
    y = rng.integers(classes, size=n).astype(np.int64)
    x = rng.standard_normal((n, channels, length))
    start = rng.integers(length - motif + 1, size=n)
    for offset in range(motif):
        x[np.arange(n), :, start + offset] += amplitude * motifs[y, :, offset]
    return _split(x.astype(np.float32), y, train)


#: dataset name -> generator; ``load_dataset(name)`` calls it with ``seed=TASK_SEED``.
GENERATED_TASKS: dict[str, Callable[..., Arrays]] = {
    "teacher-student": teacher_student,
    "tokens": tokens,
    "signals": signals,
}


def generate(name: str, seed: int = TASK_SEED) -> Arrays:
    """The raw arrays of generated task ``name`` for ``seed`` (see the module docstring)."""
    if name not in GENERATED_TASKS:
        raise ConfigError(f"unknown generated task {name!r}; valid choices: {', '.join(GENERATED_TASKS)}")
    return GENERATED_TASKS[name](seed)
