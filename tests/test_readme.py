"""The README's code runs as written: the custom estimator example, through the search, prune and a checkpoint."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import bingo
from conftest import make_mlp, tiny_data, train_tiny

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_block(containing: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    [block] = [b for b in blocks if containing in b]
    return block


@pytest.fixture
def readme_estimator():
    """Executes the README's estimator block (it registers "grad-weight"); unregisters it afterwards."""
    namespace = {"model": make_mlp()}
    exec(_python_block("class GradWeight"), namespace)
    yield namespace
    bingo.ESTIMATORS.pop("grad-weight", None)


def test_readme_custom_estimator_scores_mean_abs_grad_times_weight(readme_estimator):
    GradWeight = readme_estimator["GradWeight"]
    assert bingo.ESTIMATORS["grad-weight"] is GradWeight
    assert isinstance(readme_estimator["search"].estimator, GradWeight)

    # Hand-check the accumulation over steps on one layer: mean of |g ⊙ w| over the steps taken.
    data = tiny_data((64, 16), 4)
    seen = []

    def factory(model):
        search = bingo.TicketSearch(model, estimator="grad-weight")
        original = search.estimator.observe

        def observe(batch):
            seen.append({k: (bingo.layers.weight_of(m).grad * bingo.layers.weight_of(m)).abs().clone() for k, m in search.layers.items()})
            return original(batch)

        search.estimator.observe = observe
        return search

    model, search = train_tiny(make_mlp, data, factory, steps=6)
    assert len(seen) == 6
    raw = search.estimator.raw_scores(None)
    for key in search.layers:
        torch.testing.assert_close(raw[key], sum(step[key] for step in seen) / 6)

    # The significance feeds prune like any other: exact sparsity.
    scores = search.significance()
    assert all(((s >= 0) & (s <= 1)).all() for s in scores.values())
    masks = bingo.prune(model, scores, sparsity=0.5)
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m.bool()).sum()) for m in masks.values()) == round(0.5 * total)


def test_readme_custom_estimator_checkpoints_and_never_perturbs(readme_estimator):
    GradWeight = readme_estimator["GradWeight"]
    data = tiny_data((64, 16), 4)
    plain, _ = train_tiny(make_mlp, data)
    searched, search = train_tiny(make_mlp, data, lambda m: bingo.TicketSearch(m, estimator=GradWeight()))
    for key, value in plain.state_dict().items():
        assert torch.equal(value, searched.state_dict()[key]), key

    resumed = bingo.TicketSearch(make_mlp(), estimator=GradWeight())
    resumed.load_state_dict(search.state_dict())
    for key, value in search.significance().items():
        assert torch.equal(resumed.significance()[key], value), key

    x, y = data
    model = make_mlp()
    F.cross_entropy(model(x), y).backward()
    other = bingo.TicketSearch(model, estimator=GradWeight(), include=["1"])
    with pytest.raises(bingo.CheckpointError):
        other.load_state_dict(search.state_dict())


def test_readme_export_example_runs_and_the_program_standardises_raw_pixels(tmp_path, monkeypatch):
    import textwrap

    from bingo.bench.models import build_model

    model = build_model("lenet300", (1, 28, 28), 10, seed=0)
    bingo.prune(model, bingo.magnitude_scores(model, "neuron"), 0.5)
    model.eval()
    raw_pixels = torch.randint(0, 256, (3, 28, 28), generator=torch.Generator().manual_seed(0))
    namespace = {"bingo": bingo, "torch": torch, "model": model, "raw_pixels": raw_pixels}
    monkeypatch.chdir(tmp_path)
    exec(textwrap.dedent(_python_block("bingo.export_model(")), namespace)
    result = namespace["result"]
    assert result.shrunk and (tmp_path / "exported" / "model.json").exists()
    with torch.no_grad():
        expected = model((raw_pixels.float().reshape(3, 1, 28, 28) / 255 - 0.2860) / 0.3530)
    torch.testing.assert_close(namespace["logits"], expected, atol=1e-4, rtol=1e-4)


def test_readme_custom_estimator_keeps_its_accumulators_on_the_weights_device():
    # meta stands in for a GPU here: a state allocated without the weight's device lands on the CPU
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)).to("meta")
    namespace = {"model": model}
    try:
        exec(_python_block("class GradWeight"), namespace)
        state = namespace["search"].estimator.state
        assert {key: state[key].device.type for key in namespace["search"].layers} == {"0.weight": "meta", "2.weight": "meta"}
    finally:
        bingo.ESTIMATORS.pop("grad-weight", None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_readme_custom_estimator_searches_on_a_gpu(readme_estimator):
    data = tuple(t.cuda() for t in tiny_data((64, 16), 4))
    model, search = train_tiny(lambda: make_mlp().cuda(), data, lambda m: bingo.TicketSearch(m, estimator="grad-weight"), steps=4)
    assert all(search.estimator.state[key].is_cuda for key in search.layers)  # on the CPU, observe's += would fail
    scores = search.significance()
    masks = bingo.prune(model, scores, sparsity=0.5)
    assert sum(int((~m.bool()).sum()) for m in masks.values()) == round(0.5 * sum(m.numel() for m in masks.values()))
