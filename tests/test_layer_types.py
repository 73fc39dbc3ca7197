"""Layer types behind one registry: each built-in type and a user's one are scored, masked and re-fitted
through it, checked against closed-form least squares; tied weights are one key; nothing masked is left silently."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import bingo
from bingo import ConfigError
from bingo.layer_types import LAYER_TYPES, layer_type_of
from test_readme import _python_block


def _lstsq_rows(design: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per output unit r, the least-squares weights on its kept columns (zeros elsewhere): the closed form."""
    solution = torch.zeros(keep.shape, dtype=torch.float64)
    for r in range(keep.shape[0]):
        columns = keep[r].nonzero().squeeze(1)
        solution[r, columns] = torch.linalg.lstsq(design[:, columns].double(), targets[:, r : r + 1].double()).solution.squeeze(1)
    return solution


def _random_masks(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    return bingo.prune(model, bingo.random_scores(model, seed=seed), 0.5)


@pytest.fixture
def readme_layer_type():
    namespace: dict = {}
    exec(_python_block("class TransposedLinearLayer"), namespace)
    yield namespace
    LAYER_TYPES.remove(next(t for t in LAYER_TYPES if type(t).__name__ == "TransposedLinearLayer"))


def test_readme_layer_type_is_scored_pruned_by_column_and_refitted_exactly(readme_layer_type):
    TransposedLinear = readme_layer_type["TransposedLinear"]
    torch.manual_seed(0)
    model = nn.Sequential(TransposedLinear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    assert type(layer_type_of(model[0])).__name__ == "TransposedLinearLayer"
    search = bingo.TicketSearch(model, estimator="taylor", metric="loss", granularity="neuron")
    assert list(search.layers) == ["0.weight"] and search.unit_shape("0.weight") == (5,)
    # neuron masks remove columns of the in × out weight, with their bias entries
    keep = torch.tensor([True, False, True, True, False])
    bingo.apply_masks(model, {"0.weight": keep})
    assert torch.equal(model[0].weight_mask, keep.float().expand(6, 5))
    assert torch.equal(model[0].bias_mask, keep.float())
    # weight masks: compensation re-fits the kept entries to the dense outputs, as lstsq does
    model = nn.Sequential(TransposedLinear(6, 5))
    dense = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    masks = _random_masks(model)
    x = torch.randn(200, 6)
    result = bingo.compensate(model, None, x, damping=0.0, validation=0.0)
    assert result.layers == ("0.weight",) and result.skipped == ()
    design = torch.cat([x, torch.ones(200, 1)], 1)
    keep = torch.cat([masks["0.weight"].T, torch.ones(5, 1, dtype=torch.bool)], 1)
    expected = _lstsq_rows(design, x @ dense[0] + dense[1], keep)
    torch.testing.assert_close(model[0].weight.detach().T.double(), expected[:, :6], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model[0].bias.detach().double(), expected[:, 6], atol=1e-4, rtol=1e-4)


def test_gpt2_conv1d_is_scored_by_default_with_units_on_its_columns_and_refitted_as_lstsq():
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(5, 6))  # nf = 5 outputs, nx = 6 inputs: weight 6 × 5
    assert list(bingo.find_layers(model)) == ["0.weight"]
    assert bingo.random_scores(nn.Sequential(Conv1D(5, 6), Conv1D(3, 5)), "neuron")["0.weight"].shape == (5,)
    dense = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    masks = _random_masks(model)
    x = torch.randn(3, 70, 6)  # (batch, tokens, features): every token is a row
    result = bingo.compensate(model, None, x, damping=0.0, validation=0.0)
    assert result.layers == ("0.weight",) and result.skipped == ()
    rows = x.reshape(-1, 6)
    keep = torch.cat([masks["0.weight"].T, torch.ones(5, 1, dtype=torch.bool)], 1)
    expected = _lstsq_rows(torch.cat([rows, torch.ones(len(rows), 1)], 1), rows @ dense[0] + dense[1], keep)
    torch.testing.assert_close(model[0].weight.detach().T.double(), expected[:, :6], atol=1e-4, rtol=1e-4)
    assert torch.equal(model[0].weight == 0, ~masks["0.weight"])


@pytest.mark.parametrize("padding,stride,dilation", [(0, 1, 1), (1, 2, 1), (2, 1, 2)])
def test_conv1d_is_refitted_as_lstsq_on_its_unfolded_patches(padding, stride, dilation):
    torch.manual_seed(0)
    conv = nn.Conv1d(3, 4, 3, padding=padding, stride=stride, dilation=dilation)
    model = nn.Sequential(conv)
    dense_w, dense_b = conv.weight.detach().clone(), conv.bias.detach().clone()
    masks = _random_masks(model)
    x = torch.randn(40, 3, 12)
    result = bingo.compensate(model, None, x, damping=0.0, validation=0.0)
    assert result.layers == ("0.weight",) and result.skipped == ()
    padded = F.pad(x, (padding, padding))
    patches = padded.unfold(2, dilation * 2 + 1, stride)[..., ::dilation]  # (N, C, P, k)
    design = patches.permute(0, 2, 1, 3).reshape(-1, 3 * 3)
    targets = F.conv1d(x, dense_w, dense_b, stride=stride, padding=padding, dilation=dilation).permute(0, 2, 1).reshape(-1, 4)
    keep = torch.cat([masks["0.weight"].reshape(4, -1), torch.ones(4, 1, dtype=torch.bool)], 1)
    expected = _lstsq_rows(torch.cat([design, torch.ones(len(design), 1)], 1), targets, keep)
    torch.testing.assert_close(conv.weight.detach().reshape(4, -1).double(), expected[:, :9], atol=1e-4, rtol=1e-4)
    assert result.error_after["0.weight"] < result.error_before["0.weight"]


class TiedLM(nn.Module):
    def __init__(self, tied: bool = True):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.hidden = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.relu(self.hidden(self.embed(tokens))))


def test_a_tied_weight_is_one_key_left_out_by_default_and_one_mask_when_included():
    model = TiedLM()
    assert list(bingo.find_layers(model)) == ["hidden.weight"]
    assert bingo.layers.tied_weights(model) == {"embed.weight": ("head.weight",)}
    coverage = bingo.coverage(model, ["hidden.weight"])
    assert coverage.total == sum(p.numel() for p in model.parameters())  # the shared matrix counted once
    assert "tied weights (embed.weight = head.weight)" in str(coverage)
    # either name chooses it, under its first name
    assert list(bingo.find_layers(model, include=["head"])) == ["embed.weight"]
    scores = bingo.magnitude_scores(model, include=["*"])
    assert sorted(scores) == ["embed.weight", "hidden.weight"]
    bingo.prune(model, scores, 0.5)
    assert model.head.weight_orig is model.embed.weight_orig
    assert torch.equal(model.head.weight_mask, model.embed.weight_mask)
    assert torch.equal(model.head.weight, model.embed.weight)
    # still one parameter: training moves both uses together, and make_permanent keeps the tie
    bingo.make_permanent(model)
    assert model.head.weight is model.embed.weight
    assert len(list(model.parameters())) == 3


def test_compensation_lists_every_masked_weight_it_cannot_refit_with_the_reason_and_warns():
    torch.manual_seed(0)
    tokens = torch.randint(10, (64, 5))
    model = TiedLM()
    bingo.prune(model, bingo.magnitude_scores(model, include=["*"]), 0.5)
    with pytest.warns(UserWarning, match="compensate left some weights as they were"):
        result = bingo.compensate(model, None, tokens)
    assert result.layers == ("hidden.weight",)
    assert result.skipped == ("embed.weight: tied to head.weight; a re-fit for one use would change the other",)

    model = TiedLM(tied=False)
    bingo.prune(model, bingo.magnitude_scores(model, include=["*"]), 0.5)
    with pytest.warns(UserWarning):
        result = bingo.compensate(model, None, tokens)
    assert result.layers == ("hidden.weight", "head.weight")
    assert result.skipped == ("embed.weight: an embedding's rows are looked up, not applied to an input: "
                              "there is nothing to fit them to",)


class Bare(nn.Module):
    """A module no layer type handles: it applies its own weight."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 6))

    def forward(self, x):
        return F.linear(x, self.weight)


def test_a_masked_module_no_layer_type_handles_is_skipped_by_name():
    model = nn.Sequential(nn.Linear(6, 6), Bare())
    assert list(bingo.find_layers(model)) == ["0.weight"]
    bingo.prune(model, bingo.magnitude_scores(model, include=["*"]), 0.5)
    with pytest.warns(UserWarning, match="1.weight: no layer type is registered for Bare"):
        result = bingo.compensate(model, None, torch.randn(32, 6))
    assert result.layers == ("0.weight",)


def test_separate_qkv_projections_are_refitted_each_on_its_own_input():
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(8, 2, kdim=5, vdim=3, batch_first=True)

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = attention

        def forward(self, inputs):
            q, k, v = inputs[..., :8], inputs[..., 8:13], inputs[..., 13:]
            return self.attention(q, k, v, need_weights=False)[0]

    model = Cross()
    assert sorted(bingo.find_layers(model)) == ["attention.k_proj_weight", "attention.out_proj.weight",
                                                "attention.q_proj_weight", "attention.v_proj_weight"]
    dense_k, dense_bias = attention.k_proj_weight.detach().clone(), attention.in_proj_bias.detach().clone()
    # out_proj left dense: its input (the heads' output) spans only the values' 3 dimensions, singular undamped
    masks = bingo.prune(model, bingo.random_scores(model, include=["*proj_weight"]), 0.5)
    x = torch.randn(30, 4, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped
        result = bingo.compensate(model, None, x, damping=1e-9, validation=0.0)  # out_proj (unmasked, after them) is singular undamped
    assert result.layers == ("attention.q_proj_weight", "attention.k_proj_weight", "attention.v_proj_weight",
                             "attention.out_proj.weight")
    key_rows = x[..., 8:13].reshape(-1, 5)
    keep = torch.cat([masks["attention.k_proj_weight"], torch.ones(8, 1, dtype=torch.bool)], 1)
    expected = _lstsq_rows(torch.cat([key_rows, torch.ones(len(key_rows), 1)], 1),
                           key_rows @ dense_k.T + dense_bias[8:16], keep)
    torch.testing.assert_close(attention.k_proj_weight_orig.detach().double(), expected[:, :5], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(attention.in_proj_bias[8:16].detach().double(), expected[:, 5], atol=1e-4, rtol=1e-4)


def test_a_chain_of_gpt2_conv1d_layers_shrinks_exactly_and_counts_its_macs():
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(6, 4), nn.ReLU(), Conv1D(5, 6), nn.ReLU(), Conv1D(3, 5))
    assert bingo.count_flops(model, (7, 4)) == 7 * (4 * 6 + 6 * 5 + 5 * 3)
    bingo.apply_masks(model, {"0.weight": torch.tensor([True, False, True, True, False, True]),
                              "2.weight": torch.tensor([False, True, True, True, True])})
    small = bingo.shrink(model)
    assert isinstance(small[0], Conv1D) and small[0].weight.shape == (4, 4) and small[2].weight.shape == (4, 4)
    assert small[4].weight.shape == (4, 3)
    x = torch.randn(2, 7, 4)
    torch.testing.assert_close(small(x), model(x), atol=1e-6, rtol=1e-5)
    assert bingo.count_flops(small, (7, 4)) == 7 * (4 * 4 + 4 * 4 + 4 * 3)


def test_after_a_neuron_prune_the_unmasked_output_layer_is_refitted_on_the_pruned_activations():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 5))
    dense = copy.deepcopy(model)
    bingo.apply_masks(model, {"0.weight": torch.arange(32) % 2 == 0})  # half the hidden units; the output layer stays unmasked
    x = torch.randn(400, 10)
    with torch.no_grad():
        before = (model(x) - dense(x)).square().mean()
    result = bingo.compensate(model, None, x, damping=1e-8, validation=0.0)  # (the dead units' columns need a little)
    # the first layer's kept units already compute the dense ones: nothing to re-fit there
    assert result.layers == ("2.weight",) and result.unchanged == ("0.weight",) and result.skipped == ()
    with torch.no_grad():
        hidden = torch.relu(model[0](x))  # what the pruned network feeds the output layer
        design = torch.cat([hidden, torch.ones(len(x), 1)], 1)
        expected = _lstsq_rows(design, dense(x), torch.cat([hidden.abs().sum(0) > 0, torch.tensor([True])]).expand(5, -1))
        torch.testing.assert_close(torch.cat([model[2].weight, model[2].bias[:, None]], 1).double()[:, ::2],
                                   expected[:, ::2], atol=1e-4, rtol=1e-4)
        assert (model(x) - dense(x)).square().mean() < 0.5 * before


def test_a_tied_weight_named_by_its_other_name_is_still_one_weight_with_one_mask():
    torch.manual_seed(0)
    model = TiedLM()
    tokens = torch.randint(10, (16, 5))
    bingo.prune(model, {"head.weight": torch.rand(10, 8), "hidden.weight": torch.rand(8, 8)}, 0.5)
    assert torch.equal(model.embed.weight_mask, model.head.weight_mask) and not model.embed.weight_mask.all()
    before = model(tokens)
    bingo.make_permanent(model)
    assert model.head.weight is model.embed.weight and torch.allclose(model(tokens), before)
    # the same weight under both names: the masks combine, one mask on both uses
    model = TiedLM()
    first, second = torch.arange(80).reshape(10, 8) % 2 == 0, torch.arange(80).reshape(10, 8) % 3 == 0
    bingo.apply_masks(model, {"embed.weight": first, "head.weight": second})
    assert torch.equal(model.embed.weight_mask.bool(), first & second) and torch.equal(model.head.weight_mask.bool(), first & second)


def test_neuron_scores_of_a_gpt2_conv1d_follow_its_unit_axis_through_like():
    model = nn.Sequential(Conv1D(6, 4), nn.ReLU(), Conv1D(3, 6))
    like = {"0.weight": torch.zeros(6)}  # six output units, the columns of the 4 × 6 weight
    torch.testing.assert_close(bingo.magnitude_scores(model, like=like)["0.weight"], model[0].weight.detach().norm(dim=0))
    with pytest.raises(ConfigError, match=r"expected \(4, 6\) \(per weight\) or \(6,\) \(per neuron\)$"):
        bingo.magnitude_scores(model, like={"0.weight": torch.zeros(4)})


def test_layer_type_errors_are_one_line_config_errors():
    with pytest.raises(ConfigError, match=r"^register_layer_type takes a LayerType subclass or instance, got the class Linear$"):
        bingo.layer_types.register_layer_type(nn.Linear)
    with pytest.raises(ConfigError, match=r"^neuron granularity cannot score '0.weight': no layer type is registered for Bare"):
        bingo.find_layers(nn.Sequential(Bare(), nn.Linear(4, 2)), include=["*"], granularity="neuron")


@pytest.mark.parametrize("returned", [float("nan"), None, "high"])
def test_compensate_refuses_an_evaluate_that_does_not_return_a_finite_number(returned):
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    bingo.prune(model, bingo.magnitude_scores(model), 0.5)
    with pytest.raises(ConfigError, match=r"^compensate: evaluate\(model\) (must return a number|returned nan before)"):
        bingo.compensate(model, None, torch.randn(32, 6), evaluate=lambda m: returned)


def test_a_nan_score_after_the_refit_undoes_it():
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    bingo.prune(model, bingo.magnitude_scores(model), 0.5)
    pruned = copy.deepcopy(model)
    scores = iter([0.5, float("nan")])
    with pytest.warns(UserWarning, match="every layer: evaluate"):
        result = bingo.compensate(model, None, torch.randn(32, 6), evaluate=lambda m: next(scores))
    assert result.undone and torch.equal(model[0].weight, pruned[0].weight)


def test_coverage_names_embedding_rows_by_their_layer_type():
    from bingo.layers import coverage

    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 3))
    text = str(coverage(model, ["2.weight"]))
    assert text.endswith("not scored: embeddings 40, biases 3"), text
