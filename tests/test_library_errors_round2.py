"""Issue 20, "The library": the second hostile round's library misuse gives one-line BingoErrors.

Each case was a raw torch error, an AttributeError or a silent wrong answer before.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import bingo
from bingo import CheckpointError, ConfigError
from conftest import make_cnn, make_mlp


def _pruned_mlp() -> nn.Module:
    model = make_mlp()
    bingo.prune(model, bingo.magnitude_scores(model), 0.5)
    return model


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


# -- 1. compensate ---------------------------------------------------------------------------


def test_compensate_calibration_of_the_wrong_width_names_the_layer_and_leaves_the_model():
    model = _pruned_mlp()
    before = _state(model)
    with pytest.raises(ConfigError, match=r"^compensate: the calibration inputs give layer '1' \(Linear\) 15 input "
                                          r"features; it takes 16$"):
        bingo.compensate(model, None, torch.randn(64, 15))
    assert _unchanged(model, before)


def test_compensate_calibration_of_an_integer_dtype_names_the_layer_and_the_dtypes():
    model = _pruned_mlp()
    before = _state(model)
    with pytest.raises(ConfigError, match=r"^compensate: the calibration inputs reach layer '1' \(Linear\) as "
                                          r"torch.int64; it computes in torch.float32"):
        bingo.compensate(model, None, torch.randint(0, 3, (64, 16)))
    assert _unchanged(model, before)


def test_compensate_masks_of_a_wrong_width_calibration_are_not_applied():
    model = make_mlp()
    masks = bingo.select_masks(bingo.magnitude_scores(model), 0.5)
    with pytest.raises(ConfigError, match=r"15 input features; it takes 16$"):
        bingo.compensate(model, masks, torch.randn(64, 15))
    assert not bingo.pruned_parameters(model)


def test_compensate_conv_calibration_of_the_wrong_channels():
    model = make_cnn()
    bingo.prune(model, bingo.magnitude_scores(model), 0.5)
    with pytest.raises(ConfigError, match=r"^compensate: the calibration inputs give layer '0' \(Conv2d\) 2 input "
                                          r"channels; it takes 1$"):
        bingo.compensate(model, None, torch.randn(32, 2, 4, 4))


class _Reshaping(nn.Module):
    """An MLP that reshapes its input itself: a wrong sample shape fails in ``view``, not in a layer."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = make_mlp()

    def forward(self, x):
        return self.mlp(x.view(len(x), 4, 4)[:, :, :4].reshape(len(x), 16))


def test_compensate_calibration_the_model_cannot_take_otherwise_is_one_line():
    model = _Reshaping()
    bingo.prune(model, bingo.magnitude_scores(model), 0.5)
    before = _state(model)
    with pytest.raises(ConfigError, match=r"^compensate: the model cannot take the calibration inputs \(one sample: "
                                          r"shape \(1, 15\)\): RuntimeError: shape '\[1, 4, 4\]' is invalid") as info:
        bingo.compensate(model, None, torch.randn(32, 15))
    assert "\n" not in str(info.value)
    assert _unchanged(model, before)


def test_compensate_reference_of_another_architecture_names_the_module():
    model = _pruned_mlp()
    before = _state(model)
    with pytest.raises(ConfigError, match=r"^compensate: reference has no '1.weight' \(the model's Linear\); it must be "
                                          r"the dense model of the same architecture$"):
        bingo.compensate(model, None, torch.randn(64, 16), reference=nn.Sequential(nn.Linear(16, 4)))
    other = nn.Sequential(nn.Flatten(), nn.Linear(16, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ConfigError, match=r"^compensate: reference's '1.weight' has shape \(10, 16\), the model's "
                                          r"\(12, 16\); it must be the dense model of the same architecture$"):
        bingo.compensate(model, None, torch.randn(64, 16), reference=other)
    with pytest.raises(ConfigError, match=r"^compensate: reference must be a torch.nn.Module, got str 'dense'$"):
        bingo.compensate(model, None, torch.randn(64, 16), reference="dense")
    assert _unchanged(model, before)


@pytest.mark.parametrize("batch_size", [0, -1, 1.5, True, None, "8"])
def test_compensate_batch_size_must_be_a_positive_int(batch_size):
    model = _pruned_mlp()
    with pytest.raises(ConfigError, match=r"^compensate: batch_size must be an integer >= 1, got "):
        bingo.compensate(model, None, torch.randn(64, 16), batch_size=batch_size)


@pytest.mark.parametrize("name,value", [("damping", "a"), ("damping", float("nan")), ("damping", -0.1), ("damping", None),
                                        ("validation", "0.1"), ("validation", float("inf")), ("validation", 1.0)])
def test_compensate_damping_and_validation_ranges(name, value):
    model = _pruned_mlp()
    with pytest.raises(ConfigError, match=rf"^{name} must be a fraction in \[0, 1\), got "):
        bingo.compensate(model, None, torch.randn(64, 16), **{name: value})


def test_compensate_siblings_check_batch_size_and_calibration():
    model = make_cnn()
    with pytest.raises(ConfigError, match=r"^reestimate_batchnorm: batch_size must be an integer >= 1, got int 0$"):
        bingo.reestimate_batchnorm(model, torch.randn(8, 1, 4, 4), batch_size=0)
    with pytest.raises(ConfigError, match=r"^reestimate_batchnorm: the calibration inputs give layer '0' \(Conv2d\) 3 "):
        bingo.reestimate_batchnorm(model, torch.randn(8, 3, 4, 4))
    with pytest.raises(ConfigError, match=r"^suggested_calibration_samples: the calibration inputs give layer '1' "):
        bingo.suggested_calibration_samples(make_mlp(), torch.randn(1, 15))
    with pytest.raises(ConfigError, match=r"^suggested_calibration_samples: minimum must be an integer >= 1, got "):
        bingo.suggested_calibration_samples(make_mlp(), torch.randn(1, 16), minimum=-3)


# -- 2. -inf, NaN and +inf scores ---------------------------------------------------------------


def _with(scores: dict[str, torch.Tensor], key: str, value: float) -> dict[str, torch.Tensor]:
    scores = {k: v.clone() for k, v in scores.items()}
    scores[key].fill_(value)
    return scores


@pytest.mark.parametrize("scope", ["global", "lamp", "block"])
def test_a_layer_scored_all_minus_inf_keeps_its_floor(scope):
    model = make_mlp()
    scores = _with(bingo.magnitude_scores(model), "1.weight", -math.inf)
    masks = bingo.prune(model, scores, 0.9, scope)
    floor = bingo.selection.floor_count(192)
    if scope == "block":  # each layer of a Sequential is a block of its own: pruned to 90% inside it
        assert int(masks["1.weight"].sum()) == 192 - round(0.9 * 192)
    else:
        assert int(masks["1.weight"].sum()) == floor
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.9 * total)  # still exact


def test_minus_inf_scores_on_a_pruned_model_keep_the_floor_and_masks_only_shrink():
    model = make_mlp()
    bingo.prune(model, bingo.magnitude_scores(model), 0.5)
    before = bingo.current_masks(model, bingo.magnitude_scores(model))
    masks = bingo.prune(model, _with(bingo.magnitude_scores(model), "3.weight", -math.inf), 0.9)
    assert 1 <= int(masks["3.weight"].sum())
    assert all(not (m & ~before[k]).any() for k, m in masks.items())  # nothing pruned came back


def test_prune_to_accuracy_keeps_the_floor_of_a_minus_inf_layer():
    model = make_mlp()
    scores = _with(bingo.magnitude_scores(model), "1.weight", -math.inf)
    # the floor binds up to N - sum of floors; evaluate says fine up to 90% pruned, worse beyond
    total = sum(s.numel() for s in scores.values())

    def evaluate(net):
        pruned = sum(int((getattr(net[i], "weight_mask", torch.ones(1)) == 0).sum()) for i in (1, 3, 5))
        return 1.0 if pruned <= 0.9 * total else 0.0

    result = bingo.prune_to_accuracy(model, scores, evaluate, min_accuracy=0.5)
    assert int(result.masks["1.weight"].sum()) >= bingo.selection.floor_count(192)


def test_n_m_with_minus_inf_scores_keeps_n_of_every_group():
    model = make_mlp()
    scores = bingo.magnitude_scores(model)
    scores["1.weight"][0, :4] = -math.inf  # a whole group of 4
    masks = bingo.prune(model, scores, "2:4")
    assert bingo.is_n_m(masks["1.weight"], 2, 4)
    assert (masks["1.weight"].reshape(12, 4, 4).sum(-1) == 2).all()  # exactly 2 of 4 kept, the -inf group too


def test_select_masks_without_pruned_still_reads_minus_inf_as_already_pruned():
    # the pure function's contract is unchanged: -inf = already pruned, unless pruned= says which are
    scores = {"a": torch.full((100,), -math.inf), "b": torch.arange(100.0)}
    assert int(bingo.select_masks(scores, 0.6)["a"].sum()) == 0
    pruned = {"a": torch.zeros(100, dtype=torch.bool), "b": torch.zeros(100, dtype=torch.bool)}
    assert int(bingo.select_masks(scores, 0.6, pruned=pruned)["a"].sum()) == bingo.selection.floor_count(100)
    with pytest.raises(ConfigError, match=r"^pruned\['a'\] must be a bool tensor of the scores' shape \(100,\), got \(3,\)$"):
        bingo.select_masks(scores, 0.6, pruned={"a": torch.zeros(3, dtype=torch.bool), "b": pruned["b"]})


@pytest.mark.parametrize("call", [
    lambda m, s: bingo.prune(m, s, 0.5),
    lambda m, s: bingo.prune(m, s, 0.5, "layer"),
    lambda m, s: bingo.prune(m, s, 0.5, "lamp"),
    lambda m, s: bingo.prune(m, s, "2:4"),
    lambda m, s: bingo.prune_to_accuracy(m, s, lambda net: 1.0, max_drop=0.1),
], ids=["global", "layer", "lamp", "n:m", "to-accuracy"])
def test_nan_scores_are_refused_the_same_way_everywhere(call):
    model = make_mlp()
    scores = bingo.magnitude_scores(model)
    scores["3.weight"][0, 0] = math.nan
    with pytest.raises(ConfigError, match=r"^scores of '3.weight' contain NaN \(1 of 96\): "):
        call(model, scores)
    assert not bingo.pruned_parameters(model)


def test_plus_inf_scores_are_the_most_significant_and_lamp_refuses_them():
    model = make_mlp()
    scores = _with(bingo.magnitude_scores(model), "5.weight", math.inf)
    assert bool(bingo.prune(make_mlp(), scores, 0.5)["5.weight"].all())
    assert bool(bingo.prune(make_mlp(), scores, 0.8, "layer")["5.weight"].sum() == 32 - round(0.8 * 32))
    with pytest.raises(ConfigError, match=r"^scope 'lamp' needs finite scores >= 0 .*got infinite scores$"):
        bingo.prune(model, scores, 0.5, "lamp")


def test_prune_heads_keeps_a_head_of_an_attention_scored_all_minus_inf():
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=4, dim_feedforward=32, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    scores = bingo.head_scores(model, bingo.magnitude_scores(model))
    first = next(iter(scores))
    scores[first] = torch.full_like(scores[first], -math.inf)
    keep = bingo.prune_heads(model, scores, 0.5)
    assert int(keep[first].sum()) >= 1
    assert sum(int((~k).sum()) for k in keep.values()) == 4


# -- 3. wrong types ----------------------------------------------------------------------------


def _model_first_calls():
    """Every public function (or class) whose first argument is the model, with plausible other arguments."""
    scores = bingo.magnitude_scores(make_mlp())
    x = torch.randn(8, 16)
    return {
        "TicketSearch": lambda m: bingo.TicketSearch(m),
        "prune": lambda m: bingo.prune(m, scores, 0.5),
        "prune_to_accuracy": lambda m: bingo.prune_to_accuracy(m, scores, lambda net: 1.0, max_drop=0.1),
        "compensate": lambda m: bingo.compensate(m, None, x),
        "reestimate_batchnorm": lambda m: bingo.reestimate_batchnorm(m, x),
        "suggested_calibration_samples": lambda m: bingo.suggested_calibration_samples(m, x[:1]),
        "magnitude_scores": lambda m: bingo.magnitude_scores(m),
        "random_scores": lambda m: bingo.random_scores(m),
        "bingo_scores": lambda m: bingo.bingo_scores(scores, m),
        "apply_masks": lambda m: bingo.apply_masks(m, {k: v > 0 for k, v in scores.items()}),
        "current_masks": lambda m: bingo.current_masks(m, scores),
        "make_permanent": lambda m: bingo.make_permanent(m),
        "load_pruned_state_dict": lambda m: bingo.load_pruned_state_dict(m, {}),
        "pruned_parameters": lambda m: bingo.pruned_parameters(m),
        "model_sparsity": lambda m: bingo.model_sparsity(m),
        "find_layers": lambda m: bingo.find_layers(m),
        "coverage": lambda m: bingo.coverage(m, list(scores)),
        "head_scores": lambda m: bingo.head_scores(m, scores),
        "prune_heads": lambda m: bingo.prune_heads(m, {}, 0.5),
        "SparsityScheduler": lambda m: bingo.SparsityScheduler(m, lambda: scores, 0.5, end_step=10),
        "save_compact": lambda m: bingo.save_compact(m, "unused.safetensors"),
        "load_compact": lambda m: bingo.load_compact(m, "unused.safetensors"),
        "state_dict_size": lambda m: bingo.state_dict_size(m),
        "export_model": lambda m: bingo.export_model(m, (0.0, 1.0), (16,), "unused"),
        "RawInputModel": lambda m: bingo.RawInputModel(m, 0.0, 1.0, (16,)),
        "to_sparse": lambda m: bingo.to_sparse(m, x[:1]),
        "to_semi_structured": lambda m: bingo.to_semi_structured(m),
        "channel_groups": lambda m: bingo.channel_groups(m, x[:1]),
        "prune_coupled": lambda m: bingo.prune_coupled(m, scores, [], 0.5),
    }


NOT_MODELS = st.one_of(st.none(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8),
                       st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                       st.just(torch.ones(3)), st.just(nn.Linear))


@pytest.mark.parametrize("name", sorted(_model_first_calls()))
@settings(max_examples=8, deadline=None)
@given(value=NOT_MODELS)
def test_every_public_function_refuses_a_model_that_is_not_a_module(name, value, tmp_path_factory):
    with pytest.raises(ConfigError, match=r"model must be a torch.nn.Module, got ") as info:
        _model_first_calls()[name](value)
    assert "\n" not in str(info.value)


def test_the_issues_wrong_types_name_the_argument_what_was_given_and_what_is_expected(tmp_path):
    model = make_mlp()
    scores = bingo.magnitude_scores(model)
    cases = [
        (lambda: bingo.TicketSearch("model"), r"^TicketSearch: model must be a torch.nn.Module, got str 'model'$"),
        (lambda: bingo.prune(model, torch.ones(3), 0.5), r"^prune: scores must be a dict \{key: tensor\} .*got Tensor$"),
        (lambda: bingo.prune(model, {"1.weight": scores["1.weight"].tolist()}, 0.5),
         r"^prune: scores\['1.weight'\] must be a torch.Tensor, got list$"),
        (lambda: bingo.save_scores({"a": [1]}, tmp_path / "s.safetensors"), r"^save_scores: scores\['a'\] must be a torch.Tensor, got list \[1\]$"),
        (lambda: bingo.register_estimator(int), r"^register_estimator takes a subclass of bingo.Estimator \(a class\), got class int$"),
        (lambda: bingo.register_estimator("probe"), r"^register_estimator takes a subclass of bingo.Estimator \(a class\), got str$"),
        (lambda: bingo.TicketSearch(model, config={"fraction": 0.5}),
         r"^TicketSearch: config must be a bingo.SearchConfig .*got dict \{'fraction': 0.5\}$"),
        (lambda: bingo.select_masks(torch.ones(4), 0.5), r"^select_masks: scores must be a dict"),
        (lambda: bingo.select_n_m({"a": [1, 2, 3, 4]}, 2, 4), r"^select_n_m: scores\['a'\] must be a torch.Tensor, got list"),
        (lambda: bingo.apply_masks(model, [1]), r"^apply_masks: masks must be a dict"),
        (lambda: bingo.current_masks(model, [1]), r"^current_masks: like must be a dict"),
        (lambda: bingo.load_pruned_state_dict(model, [1]), r"^load_pruned_state_dict: state_dict must be a dict"),
        (lambda: bingo.magnitude_scores(model, like=[1]), r"^scores: like must be a dict"),
        (lambda: bingo.random_scores(model, seed="a"), r"^random_scores: seed must be an integer, got str 'a'$"),
        (lambda: bingo.prune(make_mlp(), scores, 0.5, seed="a"), r"^seed must be an integer or a torch.Generator, got str 'a'$"),
        (lambda: bingo.bingo_scores("search", model), r"^bingo_scores: search must be a TicketSearch or its significance"),
        (lambda: bingo.bingo_scores({"1.weight": [1.0]}, model), r"^bingo_scores: search\['1.weight'\] must be a torch.Tensor"),
        (lambda: bingo.combine_ranks([1, 2]), r"^combine_ranks: scores\[0\] must be a dict"),
        (lambda: bingo.combine_ranks(scores), r"^combine_ranks: scores must be a list of score dicts"),
        (lambda: bingo.find_layers(model, include=5), r"^find_layers: include must be a list of str .*got int 5$"),
        (lambda: bingo.coverage(model, 5), r"^coverage: keys must be a list of str"),
        (lambda: bingo.model_sparsity(model, 5), r"^model_sparsity: keys must be a list of str"),
        (lambda: bingo.is_n_m("mask", 2, 4), r"^is_n_m: mask must be a torch.Tensor, got str 'mask'$"),
        (lambda: bingo.prune_to_accuracy(make_mlp(), scores, "evaluate", max_drop=0.1), r"^prune_to_accuracy: evaluate must be a function"),
        (lambda: bingo.prune_to_accuracy(make_mlp(), scores, lambda n: 1.0, max_drop="a"), r"^max_drop must be an accuracy in \[0, 1\], got 'a'$"),
        (lambda: bingo.SearchConfig(exclude=5), r"^SearchConfig: exclude must be a list of str"),
        (lambda: bingo.SearchConfig(decay="a"), r"^SearchConfig.decay must be a number, got str 'a'$"),
        (lambda: bingo.SearchConfig(every="2"), r"^SearchConfig.every must be an integer or None, got str '2'$"),
        (lambda: bingo.export_model(model, (0.0, 1.0), "x", tmp_path / "out"), r"^export_model: input_shape must be a shape"),
        (lambda: bingo.RawInputModel(model, 0.0, 1.0, (0, 16)), r"^RawInputModel: input_shape must be a shape"),
    ]
    for call, pattern in cases:
        with pytest.raises(ConfigError, match=pattern) as info:
            call()
        assert "\n" not in str(info.value)
    assert bingo.find_layers(model, include="1.*") == bingo.find_layers(model, include=["1.*"])  # a str is one pattern


def _config_classes():
    from bingo.bench.strategies.base import STRATEGIES
    from bingo.bench.strategies.gmp import ScheduleConfig
    from bingo.bench.strategies.oneshot import CompensationConfig
    from bingo.bench.training import TrainConfig

    found = {bingo.SearchConfig, TrainConfig, CompensationConfig, ScheduleConfig}
    for strategy in STRATEGIES.values():
        config = getattr(strategy, "default_config", None)
        if config is not None:
            found.add(type(config))
    return sorted(found, key=lambda c: c.__name__)


def _simple_fields(cls):
    import dataclasses

    kinds = {"int", "float", "str", "bool", "None"}
    return [f.name for f in dataclasses.fields(cls)
            if isinstance(f.type, str) and all(p.strip() in kinds for p in f.type.split("|")) and "None" not in f.type]


@pytest.mark.parametrize("cls", _config_classes(), ids=lambda c: c.__name__)
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_every_config_dataclass_names_a_field_of_the_wrong_type(cls, data):
    fields = _simple_fields(cls)
    if not fields:
        return
    name = data.draw(st.sampled_from(fields))
    value = data.draw(st.one_of(st.none(), st.just([1]), st.just({"a": 1}), st.just(object())))
    with pytest.raises(ConfigError, match=rf"^{cls.__name__}.{name} must be .*, got ") as info:
        cls(**{name: value})
    assert "\n" not in str(info.value)


def test_train_config_batch_size_none_names_the_field():
    from bingo.bench.training import TrainConfig

    with pytest.raises(ConfigError, match=r"^TrainConfig.batch_size must be an integer, got None$"):
        TrainConfig(batch_size=None)
    assert TrainConfig(batch_size=64.0).batch_size == 64  # a whole float, as before


# -- 4. the meta device ----------------------------------------------------------------------------

META = r"model is on the meta device: materialise its weights first \(e.g. model.to_empty\(device=...\) and load a state_dict\)$"


def test_a_search_over_a_meta_model_is_refused_where_it_would_read_values(batch):
    search = bingo.TicketSearch(make_mlp().to("meta"))  # a shape-only stand-in is allowed (README: accumulators' device)
    with pytest.raises(ConfigError, match=rf"^search.step: {META[:-1]}, then build the TicketSearch over it$"):
        search.step(*batch)
    assert search.steps == 0


@pytest.mark.parametrize("name", ["prune", "prune_to_accuracy", "compensate", "magnitude_scores",
                                  "bingo_scores", "apply_masks", "SparsityScheduler", "save_compact", "export_model",
                                  "to_sparse", "reestimate_batchnorm", "suggested_calibration_samples", "head_scores"])
def test_a_model_on_the_meta_device_is_refused_with_what_to_do(name):
    model = make_mlp().to("meta")
    with pytest.raises(ConfigError, match=rf"^{name if name != 'bingo_scores' else 'magnitude_scores'}: {META}"):
        _model_first_calls()[name](model)


def test_meta_scores_are_refused():
    scores = {k: v.to("meta") for k, v in bingo.magnitude_scores(make_mlp()).items()}
    with pytest.raises(ConfigError, match=r"^prune: scores\['1.weight'\] is on the meta device"):
        bingo.prune(make_mlp(), scores, 0.5)


# -- 5. damaged compact files ------------------------------------------------------------------------


def _damaged_compact(tmp_path, metadata_change):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = _pruned_mlp()
    path = bingo.save_compact(model, tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    metadata_change(metadata, tensors)
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("change,pattern", [
    (lambda m, t: m.__setitem__("masked", "{not json"), r"its metadata 'masked' is not JSON"),
    (lambda m, t: m.pop("masked"), r"its metadata lacks the 'masked' entry"),
    (lambda m, t: m.__setitem__("masked", "[1, 2]"), r"its metadata 'masked' is a list, not a dict"),
    (lambda m, t: m.__setitem__("masked", '{"1.weight": 5}'), r"gives '1.weight' the shape None"),
    (lambda m, t: m.__setitem__("masked", '{"1.weight": {"shape": "ab"}}'), r"gives '1.weight' the shape 'ab'"),
    (lambda m, t: m.__setitem__("masked", '{"1.weight": {"shape": [-12, 16]}}'), r"gives '1.weight' the shape \[-12, 16\]"),
    (lambda m, t: m.__setitem__("masked", '{"1.weight": {"shape": [12, 16], "mask_dtype": "nope"}}'), r"the mask dtype 'nope'"),
    (lambda m, t: t.__setitem__("1.weight.bitmask", torch.zeros(2, dtype=torch.uint8)), r"the bitmask of '1.weight' is not 192 bits"),
    (lambda m, t: t.__setitem__("1.weight.bitmask", torch.zeros(24, dtype=torch.float32)), r"the bitmask of '1.weight' is not 192 bits"),
], ids=["json", "no-masked", "list", "info-int", "shape-str", "shape-negative", "dtype", "short-bits", "float-bits"])
def test_load_compact_with_damaged_metadata_is_a_one_line_checkpoint_error(tmp_path, change, pattern):
    path = _damaged_compact(tmp_path, change)
    with pytest.raises(CheckpointError, match=rf"^{path} is corrupt: .*{pattern}") as info:
        bingo.load_compact(make_mlp(), path)
    assert "\n" not in str(info.value)


# -- 6. the schedule ----------------------------------------------------------------------------------


@pytest.mark.parametrize("args,pattern", [
    ((5, math.nan, 0, 0, 10, 1), r"final sparsity must be a fraction in \[0, 1\), got float nan"),
    ((5, 0.5, math.inf, 0, 10, 1), r"initial sparsity must be a fraction in \[0, 1\), got float inf"),
    ((math.nan, 0.5, 0, 0, 10, 1), r"step must be a whole number of steps, got float nan"),
    ((5, 0.5, 0, math.nan, 10, 1), r"start step must be a whole number of steps, got float nan"),
    ((5, 0.5, 0, 0, math.inf, 1), r"end step must be a whole number of steps, got float inf"),
    ((5, 0.5, 0, 0, 10, math.inf), r"frequency must be a whole number of steps >= 1, got inf"),
    ((5, 0.5, 0, 0, 10, math.nan), r"frequency must be a whole number of steps >= 1, got nan"),
    ((5, "0.5", 0, 0, 10, 1), r"final sparsity must be a fraction in \[0, 1\), got str '0.5'"),
    ((5, 0.5, 0, 0, None, 1), r"end step must be a whole number of steps, got None"),
])
def test_gmp_sparsity_refuses_non_finite_and_non_numeric_arguments(args, pattern):
    with pytest.raises(ConfigError, match=rf"^the sparsity schedule's {pattern}$"):
        bingo.gmp_sparsity(*args)
    assert bingo.gmp_sparsity(5.0, 0.5, 0, 0, 10.0, 1) == bingo.gmp_sparsity(5, 0.5, 0, 0, 10, 1)


@settings(max_examples=30, deadline=None)
@given(final=st.floats(0, 0.99), initial=st.floats(0, 0.99), step=st.integers(0, 50))
def test_gmp_sparsity_is_finite_and_between_its_ends(final, initial, step):
    initial = min(initial, final)
    value = bingo.gmp_sparsity(step, final, initial, 5, 25, 3)
    assert math.isfinite(value) and initial - 1e-12 <= value <= final + 1e-12


def test_the_scheduler_checks_its_arguments_as_gmp_sparsity_does():
    scores = bingo.magnitude_scores(make_mlp())
    with pytest.raises(ConfigError, match=r"^the sparsity schedule's end step must be a whole number of steps, got None$"):
        bingo.SparsityScheduler(make_mlp(), lambda: scores, 0.5, end_step=None)
    with pytest.raises(ConfigError, match=r"frequency must be a whole number of steps >= 1, got inf$"):
        bingo.SparsityScheduler(make_mlp(), lambda: scores, 0.5, end_step=10, frequency=math.inf)
    with pytest.raises(ConfigError, match=r"^SparsityScheduler: seed must be an integer, got str 'a'$"):
        bingo.SparsityScheduler(make_mlp(), lambda: scores, 0.5, end_step=10, seed="a")
    with pytest.raises(ConfigError, match=r"^the sparsity schedule's step must be a whole number of steps, got float nan$"):
        bingo.schedule.is_update_step(math.nan, 0, 10, 1)


def test_counting_functions_refuse_a_model_that_is_not_a_module():
    import bingo

    with pytest.raises(bingo.ConfigError, match=r"^count_flops: model must be a torch.nn.Module, got str 'model'$"):
        bingo.count_flops("model", (3,))
    with pytest.raises(bingo.ConfigError, match=r"^count_parameters: model must be a torch.nn.Module, got str 'model'$"):
        bingo.count_parameters("model")
