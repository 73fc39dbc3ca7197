"""Fake passes reuse the intact pass's outputs of the layers before the probed one: same scores, fewer computations."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bingo
from bingo.bench.models import build_model


class CountingLinear(nn.Linear):
    """A Linear that counts how often its product is really computed (served calls do not reach this forward)."""

    computed = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        type(self).computed += 1
        return super().forward(x)


def chain(width: int = 12) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(CountingLinear(8, width), nn.ReLU(), CountingLinear(width, width), nn.ReLU(), CountingLinear(width, 4))


def batches(n: int = 6, inputs: int = 8, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, inputs, generator=generator), torch.randint(0, 4, (16,), generator=generator)) for _ in range(n)]


def searched(model: nn.Module, reuse: bool, data, **settings) -> bingo.TicketSearch:
    """Train ``model`` by SGD on ``data`` with a hybrid search (every step probed) and return the search."""
    search = bingo.TicketSearch(model, estimator="hybrid", metric="loss", every=1, fraction=0.25, **settings)
    search.reuse_activations = reuse
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in data:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        search.step(x, y)
    return search


def assert_same_scores(a: bingo.TicketSearch, b: bingo.TicketSearch) -> None:
    assert a.estimator.calibration() == b.estimator.calibration()
    for key, score in a.significance().items():
        assert torch.equal(score, b.significance()[key]), key


@pytest.mark.parametrize("granularity", ["weight", "neuron"])
def test_reused_outputs_give_bit_identical_scores_on_a_chain(granularity):
    data = batches()
    assert_same_scores(searched(chain(), True, data, granularity=granularity), searched(chain(), False, data, granularity=granularity))


def test_reused_outputs_give_bit_identical_scores_on_a_residual_network_with_batchnorm():
    data = [(torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(s)), torch.randint(0, 10, (8,))) for s in range(3)]
    first, second = build_model("resnet", (1, 28, 28), 10, seed=0), build_model("resnet", (1, 28, 28), 10, seed=0)
    assert_same_scores(searched(first, True, data), searched(second, False, data))


def test_a_probe_computes_only_the_layers_from_the_probed_one_on():
    data = batches(4)
    model = chain()
    search = searched(model, True, data[:1])  # the first probing step also runs every probe in full (the check)
    assert search.reuse_checked and search.reuse_activations
    x, y = data[1]
    CountingLinear.computed = 0
    search.step(x, y)
    # intact pass: 3 products; probe of layer 0: 3; of layer 2: 2 (layer 0 served); of layer 4: 1
    assert CountingLinear.computed == 3 + 3 + 2 + 1
    search.reuse_activations = False
    CountingLinear.computed = 0
    search.step(x, y)
    assert CountingLinear.computed == 4 * 3


class DoublesInPlace(nn.Module):
    """Changes the first layer's output in place after the layer returned it: that output cannot be served as recorded."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second = nn.Linear(8, 12), nn.Linear(12, 4)

    def forward(self, x):
        hidden = self.first(x)
        hidden.mul_(2)
        return self.second(torch.relu(hidden))


def test_an_output_changed_in_place_afterwards_is_computed_again():
    data = batches()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no mismatch: the version counter caught the in-place change
        reused = searched(DoublesInPlace(), True, data)
    assert reused.reuse_activations
    assert_same_scores(reused, searched(DoublesInPlace(), False, data))


class ReadsALaterWeight(nn.Module):
    """Scales its input by the last layer's weight norm before the first layer: a read outside that layer's call."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second = nn.Linear(8, 12), nn.Linear(12, 4)

    def forward(self, x):
        return self.second(torch.relu(self.first(x * self.second.weight.norm())))


def test_a_model_that_reads_a_layers_weight_outside_its_call_is_caught_and_the_reuse_turned_off():
    data = batches()
    with pytest.warns(UserWarning, match=r"^search: fake passes that reuse the intact pass's outputs of earlier layers measured "
                                         r"differently from full passes .*reuse turned off"):
        reused = searched(ReadsALaterWeight(), True, data, mode="zero")
    assert not reused.reuse_activations
    assert_same_scores(reused, searched(ReadsALaterWeight(), False, data, mode="zero"))


class Tied(nn.Module):
    """The layer called first and the one called last share one Parameter, as tied embeddings do.

    ``head`` is registered first, so the search scores the shared weight as
    ``head.weight``: its probe changes what ``embed``, called before it,
    computes.
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(8, 8, bias=False)
        self.embed, self.middle = nn.Linear(8, 8, bias=False), nn.Linear(8, 8)
        self.embed.weight = self.head.weight

    def forward(self, x):
        return self.head(torch.relu(self.middle(torch.relu(self.embed(x)))))


def test_a_tied_weight_is_never_served_from_the_record():
    data = batches(inputs=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # detected as shared up front: nothing to catch afterwards
        reused = searched(Tied(), True, data, mode="zero", include=["head", "middle"])
    assert list(reused.layers) == ["head.weight", "middle.weight"]
    assert reused.reuse_activations
    assert_same_scores(reused, searched(Tied(), False, data, mode="zero", include=["head", "middle"]))


def test_a_forward_set_on_the_instance_is_put_back_and_the_model_is_left_as_it_was():
    model = chain()
    custom = model[2].forward
    model[2].forward = custom  # an instance attribute, as some wrappers set
    searched(model, True, batches(2))
    assert model[2].__dict__["forward"] is custom
    assert all("forward" not in model[i].__dict__ for i in (0, 4))


def _encoder() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False), nn.Flatten(), nn.Linear(4 * 16, 3))


def test_a_transformer_probe_skips_the_blocks_before_its_own(monkeypatch):
    # In eval mode nn.TransformerEncoderLayer runs a fused kernel that reads its layers' weights without
    # calling them (nor its nn.MultiheadAttention, which returns a tuple and reads out_proj.weight itself):
    # a probe of a layer in block 2 is served block 1 whole, and computes block 2 and the head.
    generator = torch.Generator().manual_seed(2)
    data = [(torch.randn(8, 4, 16, generator=generator), torch.randint(0, 3, (8,), generator=generator)) for _ in range(3)]

    def run(reuse):
        model = _encoder()
        search = bingo.TicketSearch(model, estimator="hybrid", metric="loss", every=1, fraction=0.25, mode="zero")
        search.reuse_activations = reuse
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for x, y in data:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            search.step(lambda net: F.cross_entropy(net(x), y))
        return search

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reused = run(True)
    assert reused.reuse_activations
    assert any(key.endswith("out_proj.weight") for key in reused.layers)
    assert_same_scores(reused, run(False))

    computed = []
    original = nn.TransformerEncoderLayer.forward
    monkeypatch.setattr(nn.TransformerEncoderLayer, "forward", lambda self, *a, **k: computed.append(1) or original(self, *a, **k))
    x, y = data[0]
    per_block = len([key for key in reused.layers if key.startswith("0.layers.0.")])
    assert per_block == len([key for key in reused.layers if key.startswith("0.layers.1.")]) >= 4
    for reuse in (False, True):
        reused.reuse_activations = reuse
        computed.clear()
        reused.step(lambda net: F.cross_entropy(net(x), y))
        passes = 1 + len(reused.layers)
        if reuse:  # block 1 runs in the intact pass and its own probes; block 2 in those and its own (not the head's)
            assert len(computed) == (1 + per_block) + (1 + 2 * per_block)
        else:
            assert len(computed) == 2 * passes
