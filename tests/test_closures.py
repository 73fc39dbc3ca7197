"""search.step(closure) and inputs that are not one tensor: two-input models, dict inputs, Hugging Face-style outputs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bingo
from bingo import ConfigError
from conftest import make_mlp, tiny_data

ESTIMATORS = [dict(estimator="probe", metric="loss", fraction=0.2), dict(estimator="hybrid", metric="loss", mode="zero", every=2)]


class TwoInput(nn.Module):
    """Features and a mask of which features are real (like tokens and an attention mask)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hidden = nn.Linear(16, 24)
        self.dropout = nn.Dropout(0.1)
        self.out = nn.Linear(24, 4)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(F.relu(self.hidden(features * mask))))

    def training_step(self, batch: tuple, index: int) -> dict:
        """Like a LightningModule's: reaches into the submodules rather than calling forward."""
        features, mask, y = batch
        return {"loss": F.cross_entropy(self.out(F.relu(self.hidden(features * mask))), y)}


class HuggingFaceStyle(nn.Module):
    """Keyword inputs, an output object with ``.logits`` and, given labels, ``.loss``; a ``config`` attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = TwoInput()
        self.config = SimpleNamespace(num_labels=4)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None):
        logits = self.inner(input_ids, attention_mask)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SimpleNamespace(logits=logits, loss=loss)


def _batches(steps: int = 10):
    x, y = tiny_data((160, 16), 4)
    mask = (torch.arange(16) < 12).float().expand(160, 16).clone()
    for step in range(steps):
        rows = slice((step % 5) * 32, (step % 5) * 32 + 32)
        yield x[rows], mask[rows], y[rows]


def _train(model: nn.Module, loss_of, observe=None) -> nn.Module:
    """Adam on the batches; ``observe(model, features, mask, y)`` after every optimizer step."""
    torch.manual_seed(7)  # dropout
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for features, mask, y in _batches():
        loss = loss_of(model, features, mask, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if observe:
            observe(features, mask, y)
    return model


def _two_input_loss(model, features, mask, y):
    return F.cross_entropy(model(features, mask), y)


def _hf_loss(model, features, mask, y):
    return model(input_ids=features, attention_mask=mask, labels=y).loss


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("settings", ESTIMATORS, ids=lambda s: s["estimator"])
def test_closure_tuple_and_tensor_forms_measure_the_same(settings):
    """A closure computing cross-entropy, the tuple form and the one-tensor form give bit-identical scores."""
    x, y = tiny_data((64, 16), 4)

    def searched(step):
        model = make_mlp()
        search = bingo.TicketSearch(model, seed=3, **settings)
        torch.manual_seed(7)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for i in range(8):
            xb, yb = x[i % 4 :: 4], y[i % 4 :: 4]
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step(search, xb, yb)
        return search.significance()

    plain = searched(lambda s, xb, yb: s.step(xb, yb))
    closure = searched(lambda s, xb, yb: s.step(lambda m: F.cross_entropy(m(xb), yb)))
    tupled = searched(lambda s, xb, yb: s.step((xb,), yb))
    for key in plain:
        assert torch.equal(plain[key], closure[key]) and torch.equal(plain[key], tupled[key])


@pytest.mark.parametrize("settings", ESTIMATORS, ids=lambda s: s["estimator"])
def test_two_input_model_through_a_closure_and_a_tuple(settings):
    reference = _train(TwoInput(), _two_input_loss)
    searches = {}
    for form in ("closure", "tuple"):
        model = TwoInput()
        search = searches[form] = bingo.TicketSearch(model, seed=1, **settings)
        if form == "closure":
            observe = lambda f, m, y, s=search: s.step(lambda net: F.cross_entropy(net(f, m), y))  # noqa: E731
        else:
            observe = lambda f, m, y, s=search: s.step((f, m), y)  # noqa: E731
        trained = _train(model, _two_input_loss, observe)
        assert _same(trained, reference)  # the search observed and never perturbed
    closure, tupled = searches["closure"].significance(), searches["tuple"].significance()
    assert list(closure) == ["hidden.weight", "out.weight"]
    for key in closure:
        assert torch.equal(closure[key], tupled[key])



@pytest.mark.parametrize("how", ["forward", "method"])
def test_the_closure_inputs_reach_every_fake_pass(how):
    """Probes of one weight at a time: weights on features the mask hides never change the loss; others do.

    The closure may call forward or any other method (here one that uses the submodules directly):
    the probed weights are swapped in for the whole call.
    """
    model = _train(TwoInput(), _two_input_loss)
    search = bingo.TicketSearch(model, estimator="probe", metric="loss", mode="zero", fraction=1 / 384, include=["hidden"], seed=0)
    features, mask, y = next(_batches())
    if how == "forward":
        closure = lambda net: F.cross_entropy(net(features, mask), y)  # noqa: E731
    else:
        closure = lambda net: net.training_step((features, mask, y), 0)  # noqa: E731
    for _ in range(300):
        search.step(closure)
    damage = search.estimator.raw_scores("mean")["hidden.weight"].nan_to_num(0.0)  # NaN: never probed
    assert float(damage[:, 12:].abs().max()) == 0.0
    assert float(damage[:, :12].max()) > 0.0


def test_hugging_face_style_model_with_dict_inputs_and_a_loss_output():
    reference = _train(HuggingFaceStyle(), _hf_loss)
    model = HuggingFaceStyle()
    search = bingo.TicketSearch(model, estimator="hybrid", metric="loss", mode="zero", every=2, seed=0)
    seen_config = []

    def observe(features, mask, y):
        batch = {"input_ids": features, "attention_mask": mask, "labels": y}

        def closure(m):
            seen_config.append(m.config.num_labels)  # the closure is handed the model itself
            return m(**batch).loss

        search.step(closure)

    trained = _train(model, _hf_loss, observe)
    assert _same(trained, reference)
    assert set(seen_config) == {4}
    scores = search.significance()
    assert set(scores) == {"inner.hidden.weight", "inner.out.weight"}
    masks = bingo.prune(trained, scores, 0.7)
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept == sum(m.numel() for m in masks.values()) - round(0.7 * sum(m.numel() for m in masks.values()))
    # the dict form with targets works too, scoring .logits via a metric on the output object
    search = bingo.TicketSearch(HuggingFaceStyle(), estimator="probe", metric=lambda out, y: -F.cross_entropy(out.logits, y).item(), seed=0)
    features, mask, y = next(_batches())
    search.step({"input_ids": features, "attention_mask": mask}, y)
    assert int(search.probe_counts()["inner.hidden.weight"].sum()) > 0


def test_closure_errors_are_one_line_and_name_the_fix():
    model = make_mlp()
    x, y = tiny_data((32, 16), 4)
    with pytest.raises(ConfigError, match=r"^search.step\(closure\) takes the closure alone"):
        bingo.TicketSearch(model, estimator="probe", metric="loss").step(lambda m: F.cross_entropy(m(x), y), y)
    with pytest.raises(ConfigError, match=r"^search.step\(closure\): a closure returns a loss, so fake passes need metric='loss', not 'accuracy'"):
        bingo.TicketSearch(model, estimator="probe").step(lambda m: F.cross_entropy(m(x), y))
    with pytest.raises(ConfigError, match=r"^search.step\(closure\): the closure must return the batch's loss as one number \(a scalar tensor\), got a tensor of shape \(32,\)"):
        bingo.TicketSearch(model, estimator="probe", metric="loss").step(lambda m: F.cross_entropy(m(x), y, reduction="none"))
    with pytest.raises(ConfigError, match=r"^search.step\(inputs, targets\) needs a batch"):
        bingo.TicketSearch(model, estimator="probe", metric="loss").step({"a": 1}, y)
    # gradient estimators take closures too (they read .grad, not the closure), whatever the metric
    model(x).sum().backward()
    bingo.TicketSearch(model, estimator="taylor").step(lambda m: F.cross_entropy(m(x), y))
