"""Defects found in hostile round 8 (plug-ins and unusual models, N:M and solvers, training-loop integration)."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
from torch import nn

import bingo

from conftest import train_tiny, tiny_data


class _RunningMax(nn.Module):
    """Keeps the running max |activation| in every mode, as a quantization observer does.

    ``through_data``: the write goes through ``.data``, which (like torch's
    fused fake-quantize kernel) leaves the buffer's version counter where it was.
    """

    def __init__(self, through_data: bool) -> None:
        super().__init__()
        self.through_data = through_data
        self.register_buffer("amax", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self.amax.data if self.through_data else self.amax
            target.copy_(torch.maximum(self.amax, x.abs().max()))
        return x


@pytest.mark.parametrize("through_data", [False, True], ids=["in-place", "through-data"])
@pytest.mark.parametrize("config", [dataclasses.replace(bingo.BINGO_SEARCH, every=1), bingo.SearchConfig(estimator="probe", fraction=0.3, every=1)],
                         ids=["bingo", "probe"])
def test_a_module_that_writes_its_buffers_in_eval_mode_is_left_as_training_left_it(through_data, config):
    def factory():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), _RunningMax(through_data), nn.Linear(32, 4))

    data = tiny_data((64, 16), 4)
    plain, _ = train_tiny(factory, data)
    searched, search = train_tiny(factory, data, lambda m: bingo.TicketSearch(m, config=config, seed=0))
    assert search.steps == 12
    for (name, a), b in zip(plain.state_dict().items(), searched.state_dict().values()):
        assert torch.equal(a, b), name


def test_an_estimator_cannot_take_a_built_in_estimators_name():
    class Clash(bingo.estimators.TaylorEstimator):
        name = "hybrid"

    with pytest.raises(bingo.ConfigError, match=r"^register_estimator: the name 'hybrid' of Clash is a built-in "
                                                r"estimator's \(built-in: probe, .*hybrid.*\); give Clash another name$"):
        bingo.register_estimator(Clash)
    assert bingo.ESTIMATORS["hybrid"] is bingo.estimators.HybridEstimator
    assert type(bingo.TicketSearch(nn.Linear(4, 2), config=bingo.BINGO_SEARCH).estimator) is bingo.estimators.HybridEstimator


def test_a_users_estimator_registered_again_replaces_its_earlier_class():
    def define():
        class Mine(bingo.estimators.TaylorEstimator):
            name = "round8-mine"
        return bingo.register_estimator(Mine)

    try:
        first, second = define(), define()  # a notebook cell run twice
        assert first is not second and bingo.ESTIMATORS["round8-mine"] is second
    finally:
        bingo.ESTIMATORS.pop("round8-mine", None)


@pytest.mark.parametrize("bake", ["make_permanent", "permanent_copy"])
def test_baking_the_masks_in_keeps_the_parameters_in_their_dense_order(bake):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    dense_order = [name for name, _ in model.named_parameters()]
    scores = bingo.magnitude_scores(model)
    scores["0.weight"] = scores["0.weight"].abs().sum(1)  # whole units of the first layer: its bias is masked too
    bingo.prune(model, scores, sparsity=0.5, scope="layer")
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(2):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    if bake == "make_permanent":
        bingo.make_permanent(model)
        baked = model
    else:
        baked = bingo.masks.permanent_copy(model)
    assert [name for name, _ in baked.named_parameters()] == dense_order
    resumed = torch.optim.Adam(baked.parameters(), lr=0.01)
    resumed.load_state_dict(optimizer.state_dict())  # kept by position: it must fit the baked model's tensors
    resumed.zero_grad()
    nn.functional.cross_entropy(baked(x), y).backward()
    resumed.step()


def _pruned_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    bingo.prune(model, bingo.magnitude_scores(model), 0.7)
    return model


@pytest.mark.parametrize("failure", [None, KeyboardInterrupt], ids=["returns-none", "interrupted"])
def test_an_evaluate_that_fails_after_the_refit_leaves_the_model_as_pruned(failure):
    model = _pruned_mlp()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    calls = []

    def evaluate(net):
        calls.append(1)
        if len(calls) == 1:
            return 0.5
        if failure is not None:
            raise failure
        return None

    with pytest.raises(KeyboardInterrupt if failure else bingo.ConfigError):
        bingo.compensate(model, None, torch.randn(500, 16), evaluate=evaluate)
    assert len(calls) == 2
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert torch.equal(model[2].weight, model[2].weight_orig * model[2].weight_mask)


@pytest.mark.parametrize("arguments,calibration,message", [
    ({"solver": "nope"}, None, r"^unknown solver 'nope'; valid choices: auto, exact, sparsegpt, cg, or a Solver instance$"),
    ({"batchnorm": "bogus"}, None, r"^unknown batchnorm 'bogus'; valid choices: keep, reestimate$"),
    ({"batch_size": 0}, None, r"^compensate: batch_size must be an integer >= 1, got int 0$"),
    ({}, torch.randn(256, 19), r"^compensate: the calibration inputs give layer '0' \(Linear\) 19 input features; it takes 20"),
    ({}, torch.full((256, 20), float("nan")), r"^the calibration inputs hold 5120 non-finite values"),
], ids=["solver", "batchnorm", "batch-size", "width", "nan"])
def test_prune_in_steps_checks_what_compensate_needs_before_the_first_prune(arguments, calibration, message):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 4))
    before = {name: value.clone() for name, value in model.state_dict().items()}
    calibration = torch.randn(256, 20) if calibration is None else calibration
    with pytest.raises(bingo.ConfigError, match=message):
        bingo.prune_in_steps(model, bingo.magnitude_scores(model), 0.5, calibration, steps=2, **arguments)
    assert bingo.model_sparsity(model) == 0.0
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())


@pytest.mark.parametrize("spacing", [lambda i: 1.0 + i * 1e-12, lambda i: (i + 1) * 1e-50, lambda i: (i + 1) * 1e300],
                         ids=["closer-than-float32", "below-float32", "above-float32"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_float64_scores_are_ranked_in_float64(spacing, scope):
    model = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 10))
    ordered = spacing(torch.arange(100, dtype=torch.float64)).reshape(10, 10)  # strictly increasing, row-major
    masks = bingo.prune(model, {"0.weight": ordered, "2.weight": ordered.flip(1).contiguous()}, 0.5, scope=scope)
    assert masks["0.weight"].reshape(-1).tolist() == [False] * 50 + [True] * 50
    assert masks["2.weight"].flip(1).reshape(-1).tolist() == [False] * 50 + [True] * 50


def test_float64_scores_keep_their_order_inside_n_m_groups():
    model = nn.Sequential(nn.Linear(8, 1))
    tiny = (torch.arange(1, 9, dtype=torch.float64) * 1e-50).reshape(1, 8)
    assert bingo.prune(model, {"0.weight": tiny}, "2:4")["0.weight"].int().tolist() == [[0, 0, 1, 1, 0, 0, 1, 1]]


@pytest.mark.parametrize("min_sparsity", [0.5, 0.85], ids=["all-converted", "one-converted"])
def test_model_sparsity_counts_the_layers_to_sparse_converted(min_sparsity):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 5))
    scores = bingo.magnitude_scores(model)
    bingo.prune(model, {"0.weight": scores["0.weight"]}, 0.9, scope="layer")
    bingo.prune(model, {"2.weight": scores["2.weight"]}, 0.75, scope="layer")
    before = bingo.model_sparsity(model)
    assert before == pytest.approx((691 + 90) / (768 + 120))  # round(0.9 · 768) and 0.75 · 120
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = bingo.to_sparse(model, choose="always", min_sparsity=min_sparsity)
    assert len(result.converted) == (2 if min_sparsity == 0.5 else 1)
    assert bingo.model_sparsity(model) == pytest.approx(before)


def _sparse_ready_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 5))
    bingo.prune(model, bingo.magnitude_scores(model), 0.8, scope="layer")
    return model


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_to_sparse_layer_in_half_precision_computes_on_the_cpu(dtype):
    model = _sparse_ready_mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bingo.to_sparse(model, choose="always")
    reference = _sparse_ready_mlp()
    model.to(dtype)
    x = torch.randn(6, 32)
    for rows in (x, x[:1]):  # the matrix product and the matrix-vector product
        out = model(rows.to(dtype))
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), reference(rows), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("seconds", [float("nan"), -1.0, 0.0, "fast", None])
def test_a_measure_that_returns_no_time_is_refused(seconds):
    model = _sparse_ready_mlp()
    with pytest.raises(bingo.ConfigError, match=r"^to_sparse: measure\(module, x\) must return the seconds one call takes "
                                                r"\(a finite number > 0\), got "):
        bingo.to_sparse(model, measure=lambda module, x: seconds)
    assert not any(isinstance(m, bingo.SparseLinear) for m in model.modules())


def test_shrink_of_a_to_sparse_model_says_to_shrink_first():
    model = _sparse_ready_mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bingo.to_sparse(model, choose="always")
    with pytest.raises(bingo.ConfigError, match=r"^shrink: '0', '2' are bingo.to_sparse layers; shrink the masked model "
                                                r"first, then call bingo.to_sparse on the result$"):
        bingo.shrink(model, (32,))


def test_a_second_compensate_after_another_prune_warns_that_its_default_reference_is_the_first_refit():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    calibration = torch.randn(1000, 16)
    model = copy.deepcopy(dense)
    bingo.prune(model, bingo.random_scores(model, seed=1), 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the first compensate after a prune: its default reference is the dense model
        bingo.compensate(model, None, calibration)
    bingo.prune(model, bingo.random_scores(model, seed=2), 0.8)
    with pytest.warns(UserWarning, match=r"^compensate: '0', '2' were re-fitted by an earlier compensate, so the default "
                                         r"reference .* is that re-fit, not the dense network; pass reference="):
        bingo.compensate(model, None, calibration)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bingo.compensate(model, None, calibration, reference=dense)  # told the dense model: nothing to warn about


@pytest.mark.parametrize("arguments,message", [
    ({"gradual": 5}, r"^gradual must be \(start_step, end_step\), two whole numbers of optimizer steps, got int 5$"),
    ({"gradual": (0, 10, 3)}, r"^gradual must be \(start_step, end_step\), .* got tuple \(0, 10, 3\)$"),
    ({"gradual": (10, 2)}, r"^the sparsity schedule needs 0 <= start step <= end step, got 10 and 2$"),
    ({"gradual": (0, 10), "frequency": 0}, r"^the sparsity schedule's frequency must be a whole number of steps >= 1, got 0$"),
    ({"gradual": (0, 10), "calibration": torch.randn(8, 16)}, r"^gradual pruning compensates nothing"),
    ({"calibration": "x_train"}, r"^compensate needs calibration inputs"),
], ids=["int", "triple", "backwards", "frequency", "calibration-with-gradual", "calibration-str"])
def test_the_training_session_checks_its_arguments_when_built(arguments, message):
    from bingo.integrations.session import PruneAfterTraining

    with pytest.raises(bingo.ConfigError, match=message):
        PruneAfterTraining(0.5, **arguments)


def test_calibration_the_model_cannot_take_is_refused_before_training():
    from bingo.integrations.session import PruneAfterTraining

    session = PruneAfterTraining(0.5, calibration=torch.randn(16, 7))
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(bingo.ConfigError, match=r"^compensate: the calibration inputs give layer '0' \(Linear\) 7 input "
                                                r"features; it takes 16"):
        session.start(model)
    assert session.search is None


class _Transposed(nn.Module):
    """``x @ W + b`` with ``W`` stored (in × out): its units are the columns."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) / n_in**0.5)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


def _with_layer_type(layer_type, test):
    from bingo.layer_types import LAYER_TYPES, register_layer_type

    instance = register_layer_type(layer_type())
    try:
        test()
    finally:
        LAYER_TYPES.remove(instance)


def _transposed_net():
    torch.manual_seed(0)
    return nn.Sequential(_Transposed(8, 16), nn.ReLU(), _Transposed(16, 3))


def test_a_layer_type_whose_unit_axis_is_not_an_axis_gets_a_config_error():
    from bingo.layer_types import LayerType

    class BadAxis(LayerType):
        name, module_type = "bad-axis", _Transposed

        def unit_axis(self, module, name):
            return 5

    def test():
        for call in (lambda: bingo.TicketSearch(_transposed_net(), granularity="neuron"),
                     lambda: bingo.magnitude_scores(_transposed_net(), granularity="neuron")):
            with pytest.raises(bingo.ConfigError, match=r"^layer type 'bad-axis': unit_axis\(_Transposed, 'weight'\) must "
                                                        r"be an axis of the weight, 0 to 1 \(shape \(8, 16\)\), got 5$"):
                call()

    _with_layer_type(BadAxis, test)


def test_a_refit_design_of_the_wrong_width_names_the_layer():
    from bingo.layer_types import LayerType, Refit

    class BadDesign(LayerType):
        name, module_type = "bad-design", _Transposed

        def unit_axis(self, module, name):
            return 1

        def refits(self, module, name):
            return [Refit(rows=slice(None), design=lambda module, args, kwargs, output: args[0][:, :3])]

    def test():
        model = _transposed_net()
        bingo.prune(model, bingo.magnitude_scores(model), 0.5)
        with pytest.raises(bingo.ConfigError, match=r"^compensate: the design of '0.weight' \(layer type 'bad-design'\) "
                                                    r"has shape \(64, 3\); a Refit's design must be \(rows, 8\)"):
            bingo.compensate(model, None, torch.randn(64, 8))

    _with_layer_type(BadDesign, test)


def test_shrink_says_when_a_layer_type_cannot_rebuild_a_layer_with_dead_units():
    from bingo.layer_types import LayerType

    class Columns(LayerType):
        name, module_type = "columns", _Transposed

        def unit_axis(self, module, name):
            return 1

    def test():
        model = _transposed_net()
        scores = {key: value.abs().sum(0) for key, value in bingo.magnitude_scores(model).items()}  # one per column
        bingo.prune(model, scores, 0.5, scope="layer")
        with pytest.warns(UserWarning, match=r"^shrink: '0.weight', '2.weight' have whole units pruned, but no layer "
                                             r"type rebuilds such a layer smaller"):
            shrunk = bingo.shrink(model, (8,))
        assert shrunk[0].weight.shape == (8, 16)

    _with_layer_type(Columns, test)


def test_an_estimator_that_scores_the_wrong_layers_or_shapes_gets_a_config_error():
    class Partial(bingo.Estimator):
        name = "round8-partial"

        def __init__(self, scores):
            super().__init__()
            self.scores = scores

        def observe(self, batch):
            return {}

        def raw_scores(self, rule):
            return self.scores

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(4, 8), torch.randint(0, 3, (4,))
    cases = [
        ({"0.weight": torch.rand(16, 8)}, r"must score exactly the search's layers \(0.weight, 2.weight\); missing 2.weight$"),
        ({"0.weight": torch.rand(16, 8), "2.weight": torch.rand(3, 16), "x": torch.rand(1)}, r"not scored by the search x$"),
        ({"0.weight": torch.rand(5), "2.weight": torch.rand(3, 16)}, r"raw_scores\['0.weight'\] must have the layer's unit "
                                                                     r"shape \(16, 8\), got \(5,\)$"),
    ]
    for scores, message in cases:
        search = bingo.TicketSearch(model, estimator=Partial(scores))
        search.step(x, y)
        with pytest.raises(bingo.ConfigError, match=r"^estimator 'round8-partial': .*" + message):
            search.significance()


def test_the_fake_passes_leave_the_pruning_masks_untouched():
    # the masks are as large as their weights: copying them there and back on every step with fake passes is waste
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), _RunningMax(through_data=True), nn.Linear(32, 4))
    bingo.prune(model, bingo.magnitude_scores(model), 0.5)
    search = bingo.TicketSearch(model, config=dataclasses.replace(bingo.BINGO_SEARCH, every=1), seed=0)
    x, y = torch.randn(16, 16), torch.randint(0, 4, (16,))
    nn.functional.cross_entropy(model(x), y).backward()
    masks = {name: (buffer, buffer._version) for name, buffer in model.named_buffers() if name.endswith("_mask")}
    amax = model[2].amax.clone()
    search.step(x, y)
    assert all(buffer._version == version for buffer, version in masks.values())
    assert torch.equal(model[2].amax, amax)  # the observer's write still undone
