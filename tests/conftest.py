"""Small models and batches shared by the tests."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped where no CUDA GPU is present (CI has none)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def make_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4))


def make_cnn(seed: int = 0) -> nn.Module:
    """A CNN with BatchNorm and Dropout: the layers that could betray a search that perturbs training."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(16, 3),
    )


def tiny_data(shape: tuple[int, ...], classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random inputs of ``shape`` and labels in ``[0, classes)`` for :func:`train_tiny`."""
    generator = torch.Generator().manual_seed(5)
    return torch.randn(*shape, generator=generator), torch.randint(0, classes, (shape[0],), generator=generator)


#: Parametrizes a test over ``factory, data``: an MLP, and a CNN with BatchNorm and Dropout
#: (the layers that could betray a search that perturbs training), each with its tiny data set.
on_tiny_models = pytest.mark.parametrize(
    "factory,data",
    [(make_mlp, tiny_data((64, 16), 4)), (make_cnn, tiny_data((64, 1, 4, 4), 3))],
    ids=["mlp", "cnn-batchnorm-dropout"],
)


def train_tiny(factory, data, search_factory=None, steps=12):
    """Train ``factory()`` for ``steps`` Adam steps on slices of ``data``, optionally with a search.

    Returns ``(model, search)``. The search's ``step`` runs right after each
    optimizer step, and the gradients it could read must come out of it
    exactly as they went in. Same seed, same data: with and without a search
    the training must end bit-identical.
    """
    model = factory()
    torch.manual_seed(123)  # dropout draws from the global RNG
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    search = search_factory(model) if search_factory else None
    model.train()
    x_all, y_all = data
    for step in range(steps):
        x, y = x_all[step % 4 :: 4], y_all[step % 4 :: 4]
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if search:
            grads = [p.grad.clone() for p in model.parameters()]
            search.step(x, y)
            # taylor/hybrid read .grad; it must be left exactly as it was
            assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    return model, search


@pytest.fixture
def mlp() -> nn.Module:
    return make_mlp()


@pytest.fixture
def cnn() -> nn.Module:
    return make_cnn()


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(32, 16, generator=generator), torch.randint(0, 4, (32,), generator=generator)


@pytest.fixture
def image_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return torch.randn(16, 1, 4, 4, generator=generator), torch.randint(0, 3, (16,), generator=generator)


@pytest.fixture
def estimator_registry():
    """``bingo.ESTIMATORS``, restored after the test: what a test registers leaves no trace."""
    from bingo.estimators import ESTIMATORS

    saved = dict(ESTIMATORS)
    yield ESTIMATORS
    ESTIMATORS.clear()
    ESTIMATORS.update(saved)


# -- the command line, in-process ----------------------------------------------------------


def call(capsys, *argv: str) -> tuple[int, str, str]:
    """Run ``bingo ARGV`` in-process; return (exit code, stdout, stderr).

    argparse errors leave ``main`` as ``SystemExit``; a real process would
    exit with its code, so it is returned the same way.
    """
    from bingo.bench.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, pattern: str) -> str:
    """Exit 2, exactly one stderr line ``bingo: error: ...`` matching ``pattern``, no traceback.

    ``bingo: warning:`` lines before it (a caveat about the scores of a tiny run) are allowed.
    """
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.strip("\n").splitlines() if not line.startswith("bingo: warning: ")]
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    assert lines[0].startswith("bingo: error: "), lines[0]
    assert re.search(pattern, lines[0]), f"{pattern!r} not in {lines[0]!r}"
    return lines[0]
