"""Compensation against closed-form least squares, in network order, with BatchNorm re-estimated."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bingo
from bingo import ConfigError
from conftest import make_cnn, make_mlp, tiny_data, train_tiny


def _lstsq_rows(x: np.ndarray, y: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Reference: per output row, numpy's least squares on the kept columns of [x, 1]; zeros elsewhere."""
    design = np.hstack([x, np.ones((len(x), 1))])
    solution = np.zeros((y.shape[1], design.shape[1]))
    for r in range(y.shape[1]):
        columns = np.flatnonzero(np.append(keep[r], True))
        solution[r, columns] = np.linalg.lstsq(design[:, columns], y[:, r], rcond=None)[0]
    return solution


def test_one_linear_layer_matches_closed_form_least_squares():
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(6, 3))
    dense = copy.deepcopy(layer)
    x = torch.randn(200, 6)
    keep = torch.tensor([[1, 0, 1, 1, 0, 1], [0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    result = bingo.compensate(layer, {"0.weight": keep}, x, damping=0.0, validation=0.0)
    assert result.layers == ("0.weight",)
    with torch.no_grad():
        y = dense(x).double().numpy()
    expected = _lstsq_rows(x.double().numpy(), y, keep.numpy())
    got = torch.cat([layer[0].weight.detach(), layer[0].bias.detach()[:, None]], dim=1).double().numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert torch.equal(layer[0].weight == 0, ~keep)  # the masks are untouched: pruned weights stay zero
    assert result.error_after["0.weight"] < result.error_before["0.weight"]


def test_targets_are_the_dense_outputs_so_later_layers_correct_earlier_pruning():
    model = make_mlp()
    data = tiny_data((256, 16), 4)
    model, _ = train_tiny(lambda: model, data)
    dense = copy.deepcopy(model)
    scores = bingo.magnitude_scores(model)
    bingo.prune(model, scores, 0.6)
    x = data[0]
    result = bingo.compensate(model, None, x, damping=0.0, validation=0.0)
    assert result.layers == ("1.weight", "3.weight", "5.weight")  # network order
    # The output layer's target is the dense network's output: its re-fit sees the pruned inputs.
    with torch.no_grad():
        hidden = model[:5](x).double()
        y = dense(x).double()
    keep = model[5].weight_mask.bool()
    expected = _lstsq_rows(hidden.numpy(), y.numpy(), keep.numpy())
    got = torch.cat([model[5].weight.detach(), model[5].bias.detach()[:, None]], dim=1).double().numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    with torch.no_grad():
        pruned_only = copy.deepcopy(dense)
        bingo.prune(pruned_only, scores, 0.6)
        assert F.mse_loss(model(x), dense(x)) < F.mse_loss(pruned_only(x), dense(x))


def test_conv_layers_are_fitted_on_unfolded_patches():
    model = make_cnn()
    data = tiny_data((128, 1, 4, 4), 3)
    model, _ = train_tiny(lambda: model, data)
    dense = copy.deepcopy(model)
    bingo.prune(model, bingo.magnitude_scores(model), 0.5)
    x = data[0]
    result = bingo.compensate(model, None, x, damping=1e-6, validation=0.0)
    assert result.layers == ("0.weight", "5.weight", "9.weight")
    # Closed form for the conv layer: its inputs are the raw images (nothing pruned before it).
    patches = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 9).double().numpy()
    with torch.no_grad():
        y = dense[0](x).permute(0, 2, 3, 1).reshape(-1, 4).double().numpy()
    keep = model[0].weight_mask.reshape(4, -1).bool().numpy()
    expected = _lstsq_rows(patches, y, keep)
    got = torch.cat([model[0].weight.detach().reshape(4, -1), model[0].bias.detach()[:, None]], dim=1).double().numpy()
    np.testing.assert_allclose(got, expected, atol=1e-3)
    assert torch.equal(model[1].running_mean, dense[1].running_mean)  # batchnorm="keep": the dense statistics
    assert all(result.error_after[k] < result.error_before[k] for k in result.layers)


def test_batchnorm_reestimation_gives_the_statistics_of_the_calibration_data():
    model = make_cnn()
    data = tiny_data((128, 1, 4, 4), 3)
    model, _ = train_tiny(lambda: model, data)
    bingo.prune(model, bingo.magnitude_scores(model), 0.5)
    x = data[0]
    bingo.compensate(model, None, x, batchnorm="reestimate")
    with torch.no_grad():
        model.eval()
        features = model[0](x)
        hidden = model[5](model[:5](x))
    torch.testing.assert_close(model[1].running_mean, features.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model[1].running_var, features.var(dim=(0, 2, 3), unbiased=True), atol=1e-5, rtol=1e-4)
    # (the second one saw the first normalised by batch statistics, so agreement is to about 1e-3)
    torch.testing.assert_close(model[6].running_mean, hidden.mean(dim=0), atol=1e-3, rtol=1e-3)
    assert model[1].momentum == 0.1  # restored


def test_compensate_never_perturbs_rng_or_train_flags_and_refuses_bad_input():
    model = make_mlp()
    model.train()
    bingo.prune(model, bingo.magnitude_scores(model), 0.5)
    x = torch.randn(64, 16)
    state = torch.random.get_rng_state()
    bingo.compensate(model, None, x)
    assert torch.equal(torch.random.get_rng_state(), state) and model.training
    with pytest.raises(ConfigError, match=r"^compensate needs calibration inputs"):
        bingo.compensate(model, None, torch.randn(0, 16))
    with pytest.raises(ConfigError, match=r"has no pruned layer to compensate; prune it first$"):
        bingo.compensate(make_mlp(), None, torch.randn(8, 16))


def test_cli_compensation_for_any_one_shot_method_and_the_accuracy_floor(tmp_path, capsys):
    import json

    from bingo.bench.cli import main

    base = ["run", "--data", "digits", "--model", "mlp", "--epochs", "2", "--no-progress", "--method", "magnitude"]
    plain, comp = tmp_path / "plain.json", tmp_path / "comp.json"
    assert main([*base, "--sparsity", "0.9", "--out", str(plain)]) == 0
    assert main([*base, "--sparsity", "0.9", "--compensate", "--calibration-samples", "512", "--out", str(comp)]) == 0
    plain, comp = json.loads(plain.read_text()), json.loads(comp.read_text())
    assert comp["config"]["compensation"] == {"compensate": True, "calibration_samples": 512, "batchnorm": "keep", "solver": "auto"}
    assert comp["dense_accuracy"] == plain["dense_accuracy"]  # the same dense run ...
    assert comp["results"][0]["accuracy"] != plain["results"][0]["accuracy"]  # ... pruned the same way, then re-fitted
    floor = tmp_path / "floor.json"
    assert main([*base, "--max-accuracy-drop", "0.05", "--compensate", "--out", str(floor)]) == 0
    [result] = json.loads(floor.read_text())["results"]
    assert result["validation_accuracy"] >= result["validation_floor"]
    capsys.readouterr()
    assert main(["run", "--data", "digits", "--model", "mlp", "--epochs", "1", "--sparsity", "0.5", "--out", str(floor),
                 "--method", "gmp", "--compensate"]) == 2
    assert "--compensate does not apply to method 'gmp'" in capsys.readouterr().err


def test_compensated_outcome_counts_its_calibration_passes():
    from bingo.bench.data import load_dataset
    from bingo.bench.strategies import Experiment, get_strategy
    from bingo.bench.strategies.oneshot import CompensationConfig, OneShotConfig
    from bingo.bench.training import TrainConfig

    data = load_dataset("digits")
    experiment = Experiment(data, "mlp", TrainConfig(epochs=1, batch_size=64), seed=0, progress=False)
    plain = next(get_strategy("magnitude").run(experiment, [0.8]))
    config = OneShotConfig(compensation=CompensationConfig(compensate=True, calibration_samples=300))
    compensated = next(get_strategy("magnitude", config).run(experiment, [0.8]))
    # one pass, layer after layer: (pruned + dense) x (2 batches of the 270 fitted + 1 of the 30 held out)
    assert compensated.forward_passes - plain.forward_passes == 2 * 3
    assert compensated.train_steps == plain.train_steps
    assert torch.equal(torch.cat([m.flatten() for m in compensated.masks.values()]), torch.cat([m.flatten() for m in plain.masks.values()]))


def test_layers_that_already_give_the_dense_output_are_left_exactly_as_they_are():
    model = make_mlp()
    data = tiny_data((256, 16), 4)
    model, _ = train_tiny(lambda: model, data)
    dense = copy.deepcopy(model)
    keys = ("1.weight", "3.weight", "5.weight")

    def unchanged(index: int) -> bool:
        return torch.equal(model[index].weight, dense[index].weight) and torch.equal(model[index].bias, dense[index].bias)

    bingo.prune(model, bingo.magnitude_scores(model), 0.0)  # masks on, nothing removed
    result = bingo.compensate(model, None, data[0])
    assert result.layers == () and result.unchanged == ("1.weight", "3.weight", "5.weight") and result.skipped == ()
    assert all(unchanged(i) for i in (1, 3, 5))
    # Prune the output layer only: the layers before it still match the dense network and are not touched.
    model = copy.deepcopy(dense)
    masks = {key: torch.ones_like(dict(model.named_parameters())[key], dtype=torch.bool) for key in keys}
    masks["5.weight"][:, ::2] = False
    assert bingo.compensate(model, masks, data[0]).layers == ("5.weight",)
    assert unchanged(1) and unchanged(3) and not unchanged(5)


def test_the_batchnorm_setting_reaches_compensate_through_the_strategy():
    from bingo.bench.data import load_dataset
    from bingo.bench.strategies import Experiment, get_strategy
    from bingo.bench.strategies.oneshot import CompensationConfig, OneShotConfig
    from bingo.bench.training import TrainConfig

    experiment = Experiment(load_dataset("digits"), "conv", TrainConfig(epochs=1, batch_size=64), seed=0, progress=False)
    outcomes = {}
    for batchnorm in ("keep", "reestimate"):
        config = OneShotConfig(compensation=CompensationConfig(compensate=True, calibration_samples=300, batchnorm=batchnorm))
        outcomes[batchnorm] = next(get_strategy("magnitude", config).run(experiment, [0.8]))
    norms = {name: [m for m in outcome.model.modules() if isinstance(m, nn.BatchNorm2d)] for name, outcome in outcomes.items()}
    assert norms["keep"]
    dense_norms = [m for m in experiment.dense().model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(a.running_mean, b.running_mean) for a, b in zip(norms["keep"], dense_norms))
    assert not any(torch.equal(a.running_mean, b.running_mean) for a, b in zip(norms["reestimate"], dense_norms))
    # the re-estimation's forwards (batches of 256 over the calibration set: at least the 300 asked for, more for
    # the wide head, 4 rows per input; at most the whole training set) are counted
    wanted = bingo.suggested_calibration_samples(outcomes["keep"].model, experiment.calibration(1), minimum=300)
    samples = min(wanted, len(experiment.data.x_train))
    assert samples > 300
    assert outcomes["reestimate"].forward_passes - outcomes["keep"].forward_passes == math.ceil(samples / 256)
    with pytest.raises(ConfigError, match=r"^unknown batchnorm 'drop'; valid choices: keep, reestimate$"):
        CompensationConfig(batchnorm="drop")


def test_row_solves_stay_within_their_memory_chunk_whatever_the_mix_of_kept_counts(monkeypatch):
    """One output unit keeping 1 input and another keeping all 300 must not share a 300-wide block with every row."""
    from bingo.solvers import ExactSolver

    torch.manual_seed(0)
    d, out = 300, 100  # more distinct kept sets than ExactSolver solves one by one: the per-row batches
    x = torch.randn(512, d, dtype=torch.float64)
    hessian, cross = x.T @ x, x.T @ torch.randn(512, out, dtype=torch.float64)
    keep = torch.rand(out, d) < 0.05
    keep[0] = False
    keep[0, 0] = True  # one row keeps a single input
    keep[1] = True  # one keeps them all
    widest = []
    original = torch.linalg.cholesky_ex

    def watched(matrix, *args, **kwargs):
        widest.append(matrix.shape[0] * matrix.shape[-1] ** 2 * 8)
        return original(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", watched)
    chunk = 8 * 300 * 300 * 2  # room for two full-width rows
    solution = ExactSolver(chunk_bytes=chunk).solve(hessian, cross, keep, 0.01)
    assert max(widest) <= chunk
    # and the answer is each row's own least squares
    for row in (0, 1, 5):
        kept = keep[row].nonzero().flatten()
        block = hessian[kept][:, kept]
        lam = 0.01 * hessian.diagonal().mean()  # one damping for the layer: 1% of H's mean diagonal
        expected = torch.linalg.solve(block + lam * torch.eye(len(kept), dtype=torch.float64), cross[kept, row])
        torch.testing.assert_close(solution[row, kept], expected)


def test_a_refit_that_does_worse_on_held_out_samples_is_undone_and_said_so():
    torch.manual_seed(0)
    # independent inputs: the kept weights are already the best on average, so an exact fit to 144 samples (100 kept
    # inputs and a bias per unit) fits their noise; correlated inputs: the survivors can stand in for the pruned ones
    mixing = torch.randn(12, 200)
    layer = nn.Sequential(nn.Linear(200, 6))
    bingo.prune(layer, bingo.magnitude_scores(layer), 0.5)
    pruned = copy.deepcopy(layer)
    few = torch.randn(160, 200)
    with pytest.warns(UserWarning, match=r"0.weight: the re-fit reproduced the dense outputs worse on the 16 held-out"):
        result = bingo.compensate(layer, None, few, damping=0.0)
    assert result.layers == () and torch.equal(layer[0].weight_orig, pruned[0].weight_orig)  # left exactly as it was
    assert torch.equal(layer[0].bias, pruned[0].bias)
    many = torch.randn(3000, 12) @ mixing + 0.3 * torch.randn(3000, 200)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = bingo.compensate(layer, None, many, damping=0.0)
    assert result.layers == ("0.weight",) and result.error_after["0.weight"] < result.error_before["0.weight"]
    # the check is a held-out one: the same few samples with it off are fitted (in-sample error can only drop)
    layer = copy.deepcopy(pruned)
    result = bingo.compensate(layer, None, few, damping=0.0, validation=0.0)
    assert result.layers == ("0.weight",)
    with pytest.raises(ConfigError, match=r"^validation must be a fraction in \[0, 1\), got 1.5$"):
        bingo.compensate(layer, None, few, validation=1.5)
    # fewer than 16 held out: no check, every sample fitted (15 of 159 would be too few to judge by)
    layer = copy.deepcopy(pruned)
    assert bingo.compensate(layer, None, few[:159], damping=0.0).layers == ("0.weight",)


def test_evaluate_guards_the_whole_model_and_undoes_a_refit_that_makes_it_worse():
    torch.manual_seed(0)
    model = make_mlp()
    dense = copy.deepcopy(model).eval()
    x = torch.randn(256, 16)
    bingo.prune(model, bingo.magnitude_scores(model), 0.7)
    pruned = copy.deepcopy(model)
    calls = []

    def prefers_the_pruned_weights(net):  # a held-out score under which any change is worse
        calls.append(1)
        return -float(sum((a - b).abs().sum() for a, b in zip(net.parameters(), pruned.parameters())))

    with pytest.warns(UserWarning, match=r"every layer: evaluate\(\) gave -[0-9.e+]+ after the re-fit, -?0 before"):
        result = bingo.compensate(model, None, x, evaluate=prefers_the_pruned_weights)
    assert result.undone and result.evaluation[0] == 0.0 and result.evaluation[1] < 0 and len(calls) == 2
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), pruned.state_dict().values()))
    assert torch.equal(model[1].weight, pruned[1].weight)  # the masked tensor the forward uses, too

    def close_to_dense(net):  # what the re-fit aims at: it improves, so it stays
        with torch.no_grad():
            return -float((net.eval()(x) - dense(x)).square().mean())

    model = copy.deepcopy(pruned)
    result = bingo.compensate(model, None, x, evaluate=close_to_dense)
    assert not result.undone and result.layers and result.evaluation[1] > result.evaluation[0]
    assert not torch.equal(model[1].weight, pruned[1].weight)
