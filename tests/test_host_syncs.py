"""The search's hot path does not wait for the device: no host read-back on a step without fake passes, one with.

On the CPU nothing waits, so the test counts the calls that would wait on a
GPU (``Tensor.item``, ``tolist``, ``cpu``, ``numpy`` and the conversions
``float()``, ``int()``, ``bool()`` of a tensor) while ``search.step`` runs.
Where CUDA is present, ``torch.cuda.set_sync_debug_mode("error")`` checks the
same on the device itself.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bingo
from bingo.estimators.targeted import Focus

READ_BACKS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


@contextlib.contextmanager
def counting_read_backs():
    """``calls``: how many read-backs of a tensor to the host ran inside the block."""
    calls = []
    originals = {name: getattr(torch.Tensor, name) for name in READ_BACKS}

    def wrapped(name):
        original = originals[name]

        def call(self, *args, **kwargs):
            calls.append(name)
            return original(self, *args, **kwargs)

        return call

    for name in READ_BACKS:
        setattr(torch.Tensor, name, wrapped(name))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def _model(device="cpu"):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).to(device)


SETTINGS = {
    "bingo (hybrid)": dict(config=bingo.BINGO_SEARCH, every=3),
    "paper (probe, accuracy)": dict(estimator="probe", metric="accuracy", mode="reset", every=3),
    "probe, contrast": dict(estimator="probe", metric="loss", rule="contrast", every=3),
    "taylor, plain mean": dict(estimator="taylor", decay=1.0, every=3),
    "hybrid, neurons": dict(config=bingo.BINGO_SEARCH, granularity="neuron", every=3),
    "hybrid, targeted": dict(config=bingo.BINGO_SEARCH, target=0.5, every=3),
    "probe, targeted": dict(estimator="probe", metric="accuracy", target=0.5, every=3),
}


def _train_and_count(settings, steps=7, closure=False, device="cpu"):
    model = _model(device)
    search = bingo.TicketSearch(model, seed=0, **settings)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(1)
    counts = []
    for _ in range(steps):
        x = torch.randn(32, 12, generator=generator).to(device)
        y = torch.randint(0, 4, (32,), generator=generator).to(device)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        with counting_read_backs() as calls:
            if closure:
                search.step(lambda net: F.cross_entropy(net(x), y))
            else:
                search.step(x, y)
        counts.append(len(calls))
    return search, counts


@pytest.mark.parametrize("name", list(SETTINGS))
def test_one_read_back_on_steps_with_fake_passes_and_none_on_the_others(name):
    # A targeted search re-decides its focus on every REFRESH-th round of fake passes (the first one
    # included): those rounds read the scores back; the rounds between them do not.
    steps = 3 * (Focus.REFRESH + 2)
    search, counts = _train_and_count(SETTINGS[name], steps=steps)
    probes = search.config.estimator_name != "taylor"
    for step, count in enumerate(counts, start=1):
        due = (step - 1) % search.every == 0
        refocus = search.config.target and due and ((step - 1) // search.every) % Focus.REFRESH == 0
        if not refocus:
            assert count == (1 if due and probes else 0), (name, step, counts)


def test_a_closure_search_reads_back_once_per_due_step():
    search, counts = _train_and_count(SETTINGS["bingo (hybrid)"], steps=4, closure=True)
    assert counts == [1, 0, 0, 1]


def test_synchronize_adds_no_read_back_on_the_cpu():
    search, counts = _train_and_count({**SETTINGS["bingo (hybrid)"], "synchronize": True}, steps=4)
    assert counts == [1, 0, 0, 1] and search.synchronize and search.seconds > 0


def test_the_counter_sees_what_it_counts():
    # The test bites: a float() of a tensor inside the block is counted.
    with counting_read_backs() as calls:
        float(torch.ones(()))
        torch.ones(2).tolist()
    assert calls == ["__float__", "item", "tolist"] or calls == ["__float__", "tolist"]


@pytest.mark.cuda
def test_no_synchronising_cuda_call_on_a_step_without_fake_passes():
    model = _model("cuda")
    search = bingo.TicketSearch(model, config=bingo.BINGO_SEARCH, every=1000, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 12, device="cuda"), torch.randint(0, 4, (32,), device="cuda")
    for step in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        if step == 0:
            search.step(x, y)  # due: fake passes, one read-back
            continue
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            search.step(x, y)
        finally:
            torch.cuda.set_sync_debug_mode("default")
