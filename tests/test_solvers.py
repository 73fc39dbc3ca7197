"""Compensation's solvers against closed-form least squares, and its one pass against one pass per layer."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import bingo
from bingo import ConfigError
from bingo.solvers import SOLVERS, ConjugateGradientSolver, ExactSolver, Solver, SparseGPTSolver, choose_solver, get_solver, register_solver
from conftest import make_cnn, tiny_data


def _problem(d: int = 12, rows: int = 5, samples: int = 300, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.eye(d, dtype=torch.float64) + torch.randn(d, d, generator=generator, dtype=torch.float64)
    x = torch.randn(samples, d, generator=generator, dtype=torch.float64) @ mixing  # correlated inputs
    y = torch.randn(samples, rows, generator=generator, dtype=torch.float64)
    return x, y, x.T @ x, x.T @ y


def _lstsq(x: torch.Tensor, y: torch.Tensor, keep: torch.Tensor, lam: float) -> torch.Tensor:
    """Per row, ``torch.linalg.lstsq`` of ``[X_S; √λ I] w = [y; 0]`` (ridge) on the kept columns; zeros elsewhere."""
    solution = torch.zeros(keep.shape, dtype=torch.float64)
    for r in range(keep.shape[0]):
        columns = keep[r].nonzero().flatten()
        if not len(columns):
            continue
        a = torch.cat([x[:, columns], lam**0.5 * torch.eye(len(columns), dtype=torch.float64)])
        b = torch.cat([y[:, r], torch.zeros(len(columns), dtype=torch.float64)])
        solution[r, columns] = torch.linalg.lstsq(a, b[:, None]).solution.flatten()
    return solution


def _error(x, y, rows):
    return float((x @ rows.T - y).square().sum())


def _n_m_keep(rows: int, d: int, n: int, m: int, seed: int = 1) -> torch.Tensor:
    scores = torch.rand(rows, d // m, m, generator=torch.Generator().manual_seed(seed))
    kept = scores.topk(n, dim=-1).indices
    return torch.zeros(rows, d // m, m, dtype=torch.bool).scatter_(-1, kept, True).reshape(rows, d)


MASKS = {
    "unstructured": lambda rows, d: torch.rand(rows, d, generator=torch.Generator().manual_seed(3)) < 0.5,
    "2:4": lambda rows, d: _n_m_keep(rows, d, 2, 4),
    "1:4": lambda rows, d: _n_m_keep(rows, d, 1, 4),
    "channels": lambda rows, d: (torch.arange(d) % 3 != 0).expand(rows, d).clone(),  # every row the same inputs
}


@pytest.mark.parametrize("pattern", MASKS)
@pytest.mark.parametrize("damping", [0.0, 0.01])
def test_exact_and_cg_solvers_give_each_rows_own_least_squares(pattern, damping):
    x, y, hessian, cross = _problem()
    keep = MASKS[pattern](5, 12)
    keep[4] = False  # a pruned unit: its row is all zero
    lam = damping * float(hessian.diagonal().mean())
    expected = _lstsq(x, y, keep, lam)
    for solver in (ExactSolver(), ExactSolver(chunk_bytes=8), ConjugateGradientSolver(max_iterations=200, tolerance=0.0)):
        got = solver.solve(hessian, cross, keep, damping)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
        assert torch.all(got[~keep] == 0)


@pytest.mark.parametrize("pattern", MASKS)
def test_sparsegpt_sweep_keeps_the_mask_and_lands_between_the_optimum_and_the_masked_optimum(pattern):
    x, y, hessian, cross = _problem(d=16, rows=6)
    keep = MASKS[pattern](6, 16)
    got = SparseGPTSolver().solve(hessian, cross, keep, 0.0)
    assert torch.all(got[~keep] == 0)
    exact = ExactSolver().solve(hessian, cross, keep, 0.0)
    unconstrained = torch.linalg.solve(hessian, cross).T
    assert _error(x, y, exact) <= _error(x, y, got) * (1 + 1e-9)
    assert _error(x, y, got) <= _error(x, y, unconstrained * keep) * (1 + 1e-9)


def test_sweep_on_a_diagonal_hessian_is_the_exact_answer():
    """Independent inputs: pruning a column moves no other, so the sweep is exact (OBS with a diagonal H)."""
    d = 8
    hessian = torch.diag(torch.arange(1.0, d + 1, dtype=torch.float64))
    cross = torch.randn(d, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    keep = MASKS["2:4"](3, d)
    expected = (cross / hessian.diagonal()[:, None]).T * keep
    torch.testing.assert_close(SparseGPTSolver().solve(hessian, cross, keep, 0.0), expected)


def test_default_cg_stops_within_a_percent_of_the_optimum():
    x, y, hessian, cross = _problem(d=64, rows=32, samples=2000)
    keep = MASKS["unstructured"](32, 64)
    exact = ExactSolver().solve(hessian, cross, keep, 0.01)
    solver = ConjugateGradientSolver()
    got = solver.solve(hessian, cross, keep, 0.01)
    assert 1 <= solver.iterations < solver.max_iterations
    assert _error(x, y, got) <= 1.01 * _error(x, y, exact)


def test_dead_inputs_solve_to_zero_without_damping():
    x, y, _, _ = _problem()
    x[:, 3] = 0  # an input never active (a dead ReLU, a pruned unit upstream)
    hessian, cross = x.T @ x, x.T @ y
    keep = torch.ones(5, 12, dtype=torch.bool)
    for name in SOLVERS:
        got = SOLVERS[name]().solve(hessian, cross, keep, 0.0)
        assert torch.isfinite(got).all() and torch.all(got[:, 3] == 0), name


def test_auto_takes_the_exact_solver_where_it_is_cheap_and_cg_where_rows_differ_on_a_wide_layer():
    d, rows = 512, 512
    assert choose_solver(d, MASKS["channels"](rows, d)).name == "exact"  # one factorisation for the layer
    assert choose_solver(d, torch.rand(rows, d) < 0.1).name == "exact"  # 90%: small per-row systems
    assert choose_solver(d, MASKS["2:4"](rows, d)).name == "cg"
    assert choose_solver(d, torch.rand(rows, d) < 0.5).name == "cg"


def test_solver_choices_and_registration_errors():
    assert get_solver("auto") is None and isinstance(get_solver("exact"), ExactSolver)
    mine = ExactSolver()
    assert get_solver(mine) is mine
    with pytest.raises(ConfigError, match=r"unknown solver 'qr'; valid choices: auto, exact, sparsegpt, cg, or a Solver instance"):
        get_solver("qr")
    with pytest.raises(ConfigError, match="takes a Solver subclass"):
        register_solver(int)

    class Nameless(Solver):
        pass

    with pytest.raises(ConfigError, match="needs a class attribute 'name'"):
        register_solver(Nameless)
    model = nn.Sequential(nn.Linear(4, 3))
    bingo.prune(model, bingo.magnitude_scores(model), 0.5)
    with pytest.raises(ConfigError, match="unknown solver"):
        bingo.compensate(model, None, torch.randn(20, 4), solver="qr")
    with pytest.raises(ConfigError, match=r"unknown mode 'fast'; valid choices: auto, graph, per-layer"):
        bingo.compensate(model, None, torch.randn(20, 4), mode="fast")


def test_compensate_reports_the_solver_each_layer_used_and_their_flops():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
    bingo.prune(model, bingo.magnitude_scores(model, include=["*"]), 0.5, scope="layer")
    result = bingo.compensate(model, None, torch.randn(400, 32), solver="sparsegpt")
    assert set(result.solvers.values()) == {"sparsegpt"} and set(result.solvers) == set(result.layers)
    assert result.solve_flops > 0


# --- one pass, layer after layer -------------------------------------------------------------------

class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(1, 6, 3, padding=1)
        self.norm = nn.BatchNorm2d(6)
        self.body = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1))
        self.head = nn.Linear(6 * 8 * 8, 5)

    def forward(self, x):
        h = torch.relu(self.norm(self.stem(x)))
        h = torch.relu(h + self.body(h))
        return self.head(h.flatten(1))


class Attending(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(6, 16)
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h = self.embed(x)
        a, _ = self.attention(h, h, h, need_weights=False)
        return self.out((h + a).mean(dim=1))


class Branching(nn.Module):
    """Control flow on a value: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if h.sum() > 0:
            h = h * 2
        return self.b(h)


CASES = {
    "residual cnn": (Residual, (64, 1, 8, 8)),
    "attention": (Attending, (64, 5, 6)),
    "cnn": (make_cnn, (64, 1, 4, 4)),
}


@pytest.mark.parametrize("case", CASES)
def test_one_pass_gives_the_same_weights_as_one_pass_per_layer(case):
    factory, shape = CASES[case]
    x = tiny_data(shape, 3)[0]
    model = factory()
    bingo.prune(model, bingo.magnitude_scores(model, include=["*"]), 0.6)
    per_layer = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = bingo.compensate(model, None, x, batch_size=24, mode="auto")
        two = bingo.compensate(per_layer, None, x, batch_size=24, mode="per-layer")
    assert one.mode == "graph" and two.mode == "per-layer"
    assert one.layers == two.layers and one.skipped == two.skipped and len(one.layers) >= 2
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, per_layer.state_dict()[name], rtol=1e-4, atol=1e-5, msg=name)
    for key in one.layers:
        assert one.error_before[key] == pytest.approx(two.error_before[key], rel=1e-5)
        assert one.error_after[key] == pytest.approx(two.error_after[key], rel=1e-3, abs=1e-9)
    assert one.forward_passes == 2 * 3  # pruned + dense, 3 batches (57 fitted in 3 of 24; 6 held out... in one)


def test_one_pass_costs_two_forwards_per_batch_on_a_deep_mlp_and_copies_no_model(monkeypatch):
    torch.manual_seed(0)
    layers = []
    for _ in range(12):
        layers += [nn.Linear(24, 24), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(24, 4))
    x = torch.randn(512, 24)
    bingo.prune(model, bingo.magnitude_scores(model, include=["*"]), 0.5)
    copies = []
    real = copy.deepcopy
    monkeypatch.setattr(copy, "deepcopy", lambda *a, **k: copies.append(1) or real(*a, **k))
    result = bingo.compensate(model, None, x, batch_size=128, damping=1e-4)
    batches = 4 + 1  # 461 fitted samples in 4 batches of 128, 51 held out in one
    assert result.mode == "graph" and result.forward_passes == 2 * batches and result.layer_calls == 0
    assert len(result.layers) + len(result.skipped) == 13 and len(result.layers) >= 12 and not copies


def test_a_model_fx_cannot_trace_falls_back_to_one_pass_per_layer_and_says_why():
    model = Branching()
    bingo.prune(model, bingo.magnitude_scores(model, include=["*"]), 0.5)
    x = torch.randn(200, 8)
    result = bingo.compensate(model, None, x, validation=0.0)
    assert result.mode.startswith("per-layer (torch.fx cannot trace Branching")
    assert result.layers == ("a.weight", "b.weight")
    with pytest.raises(ConfigError, match=r"compensate\(mode='graph'\): torch.fx cannot trace Branching"):
        bingo.compensate(model, None, x, mode="graph")


def test_one_pass_with_a_dense_reference_model_given():
    factory, shape = CASES["residual cnn"]
    x = tiny_data(shape, 3)[0]
    dense = factory()
    model = copy.deepcopy(dense)
    bingo.prune(model, bingo.magnitude_scores(model, include=["*"]), 0.7)
    bingo.make_permanent(model)  # weight_orig is gone: the dense weights come from `reference`
    bingo.prune(model, bingo.magnitude_scores(model, include=["*"]), 0.7)  # masks again, on the zeroed weights
    per_layer = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = bingo.compensate(model, None, x, reference=dense)
        two = bingo.compensate(per_layer, None, x, reference=dense, mode="per-layer")
    assert one.mode == "graph" and one.layers == two.layers
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, per_layer.state_dict()[name], rtol=1e-4, atol=1e-5, msg=name)
    assert all(one.error_after[k] <= one.error_before[k] for k in one.layers)  # else the layer is put back


def test_suggested_calibration_samples_follow_the_widest_layer():
    mlp = nn.Sequential(nn.Linear(784, 30), nn.ReLU(), nn.Linear(30, 10))
    bingo.prune(mlp, bingo.magnitude_scores(mlp), 0.5)
    assert bingo.suggested_calibration_samples(mlp, torch.randn(1, 784)) == 4 * 785  # 4 rows per input of the first
    assert bingo.suggested_calibration_samples(mlp, torch.randn(1, 784), minimum=5000) == 5000
    conv = nn.Sequential(nn.Conv2d(64, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 4 * 4, 3))
    bingo.prune(conv, bingo.magnitude_scores(conv, include=["*"]), 0.5)
    # the conv gets 16 rows per image (4x4 positions) for 64*9+1 inputs; the linear 1 row for 129
    assert bingo.suggested_calibration_samples(conv, torch.randn(1, 64, 4, 4), minimum=1) == max(
        math.ceil(4 * 577 / 16), 4 * 129)


class ShapeBranching(nn.Module):
    """Control flow on a shape, as models often have (accept (N, H, W) or (N, 1, H, W)): traced on meta tensors."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.head = nn.Conv2d(1, 4, 3), nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        if x.dim() == 3:
            x = x.unsqueeze(1)
        return self.head(torch.relu(self.conv(x)).flatten(1))


def test_shape_dependent_control_flow_still_runs_in_one_pass():
    model = ShapeBranching()
    bingo.prune(model, bingo.magnitude_scores(model, include=["*"]), 0.6)
    per_layer = copy.deepcopy(model)
    x = torch.randn(100, 8, 8)
    one = bingo.compensate(model, None, x, validation=0.0)
    two = bingo.compensate(per_layer, None, x, validation=0.0, mode="per-layer")
    assert one.mode == "graph" and one.layers == two.layers
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, per_layer.state_dict()[name], rtol=1e-4, atol=1e-5, msg=name)
