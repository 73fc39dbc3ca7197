"""bingo.to_sparse: sparse enough Linears as CSR matrices, chosen per layer by measurement, exact to float rounding.

No test here depends on a clock: the decisions are driven by ``measure=``
(a fake timing, a function of the module) or ``choose="always"``; the one
test that times for real asserts only what holds whatever it measures.
"""

from __future__ import annotations

import copy
import io
import json
import pickle

import pytest
import torch
from torch import nn

import bingo
from bingo import ConfigError, SparseLinear
from bingo.sparse import forward_seconds

from conftest import make_mlp

NO_CUDA = not torch.cuda.is_available()


def pruned_mlp(sparsity: float = 0.9, seed: int = 0) -> nn.Module:
    model = make_mlp(seed)  # Flatten, Linear(16, 12), ReLU, Linear(12, 8), ReLU, Linear(8, 4)
    bingo.prune(model, bingo.magnitude_scores(model), sparsity=sparsity, scope="layer")
    return model.eval()


def fake_measure(fast_in_features: set[int], calls: list | None = None):
    """Seconds per call: 1 for any module but a SparseLinear, which takes 0.5 if its width is in ``fast_in_features``, else 2."""
    def measure(module: nn.Module, x: torch.Tensor) -> float:
        if calls is not None:
            calls.append((type(module).__name__, getattr(module, "in_features", None), tuple(x.shape)))
        if isinstance(module, SparseLinear):
            return 0.5 if module.in_features in fast_in_features else 2.0
        return 1.0
    return measure


def test_a_hand_checked_sparse_linear():
    weight = torch.tensor([[1.0, 0.0, 0.0, 2.0], [0.0, 0.0, 3.0, 0.0]])
    layer = SparseLinear(weight, torch.tensor([1.0, -1.0]))
    assert layer.weight.layout == torch.sparse_csr
    assert layer.weight_crow_indices.tolist() == [0, 2, 3] and layer.weight_col_indices.tolist() == [0, 3, 2]
    assert layer.weight_values.tolist() == [1.0, 2.0, 3.0] and layer.weight_col_indices.dtype == torch.int32
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    assert layer(x).tolist() == [[4.0, 2.0], [10.0, 8.0]]  # [1+2+1, 3-1], [1+8+1, 9-1]
    assert layer(x[1]).tolist() == [10.0, 8.0]  # one sample without a batch axis, as nn.Linear takes it
    assert layer(x[:1]).tolist() == [[4.0, 2.0]]  # batch 1: the matrix-vector kernel
    assert (layer.in_features, layer.out_features, layer.sparsity) == (4, 2, 0.625)
    assert repr(layer) == ("SparseLinear(in_features=4, out_features=2, bias=True, layout=sparse_csr, nnz=3, "
                           "sparsity=0.625)")
    with pytest.raises(RuntimeError, match=r"^SparseLinear takes inputs shaped \(\.\.\., 4\); got \(2, 2\)$"):
        layer(torch.ones(2, 2))  # 4 numbers, but not 4 features: no silent reshape


def test_outputs_equal_the_masked_model_under_every_mode_and_leading_shape():
    model = pruned_mlp()
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(x)
    result = bingo.to_sparse(model, choose="always")
    assert result.converted == ("1", "3", "5")
    assert [type(model[i]).__name__ for i in (1, 3, 5)] == ["SparseLinear"] * 3
    assert not any(name.endswith("_mask") or name.endswith("_orig") for name, _ in model.named_parameters())
    torch.testing.assert_close(model(x), before)  # grad mode on: the input needs none, so it runs as at inference
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), before)
    with torch.no_grad():
        torch.testing.assert_close(model(x[:1]), before[:1])
    layer = model[1]
    batched = torch.randn(2, 3, 5, 16)
    torch.testing.assert_close(layer(batched), nn.functional.linear(batched, layer.weight.to_dense(), layer.bias))


def test_the_chooser_decides_per_layer_by_what_it_measures():
    model = pruned_mlp()
    calls: list = []
    result = bingo.to_sparse(model, measure=fake_measure({12}, calls), repeats=3)
    assert result.converted == ("3",)  # only the layer whose sparse form measured faster
    assert isinstance(model[3], SparseLinear)
    assert isinstance(model[1], nn.Linear) and hasattr(model[1], "weight_mask")  # kept as it was, mask and all
    rows = {layer.name: layer for layer in result.layers}
    assert rows["3"].speedup == 2.0 and rows["3"].speedup_range == (2.0, 2.0) and rows["3"].reason == "faster as CSR"
    assert rows["1"].speedup == 0.5 and rows["1"].reason == "slower as CSR (0.50× the layer as it is)"
    assert rows["1"].input_shape == (1, 16) and rows["3"].input_shape == (1, 12)
    # interleaved: per layer, 3 rounds of (the layer, its CSR form), every layer timed on its own width
    assert calls[:6] == [("Linear", 16, (1, 16)), ("SparseLinear", 16, (1, 16))] * 3
    assert len(calls) == 3 * 2 * 3
    assert json.loads(json.dumps(result.as_dict()))["converted"] == ["3"]


def test_layers_below_min_sparsity_are_left_alone_and_not_timed():
    model = make_mlp().eval()
    bingo.apply_masks(model, {"1.weight": torch.rand(12, 16, generator=torch.Generator().manual_seed(0)) > 0.2,
                              "5.weight": torch.rand(4, 8, generator=torch.Generator().manual_seed(1)) > 0.9})
    first, middle = model[1], model[3]
    calls: list = []
    result = bingo.to_sparse(model, min_sparsity=0.5, measure=fake_measure({8, 12, 16}, calls))
    assert result.converted == ("5",)
    assert model[1] is first and model[3] is middle  # the 20%-masked and the dense layer: not touched
    assert {in_features for _, in_features, _ in calls} == {8}
    rows = {layer.name: layer for layer in result.layers}
    assert rows["3"].reason == "sparsity 0.00 below min_sparsity 0.5" and rows["3"].speedup is None
    assert rows["1"].reason.startswith("sparsity 0.") and rows["1"].reason.endswith("below min_sparsity 0.5")


def test_a_plain_linear_with_zeros_converts_too():
    layer = nn.Linear(16, 8)
    with torch.no_grad():
        layer.weight[:, :12] = 0
    model = nn.Sequential(layer).eval()
    x = torch.randn(4, 16)
    before = model(x).detach()
    result = bingo.to_sparse(model, choose="always")
    assert result.converted == ("0",) and result.layers[0].sparsity == 0.75
    assert model[0].weight_values.numel() == 32
    torch.testing.assert_close(model(x), before)


@pytest.mark.parametrize("kwargs,message", [
    ({"min_sparsity": 1.0}, r"^min_sparsity must be a number in \[0, 1\) .*got 1\.0$"),
    ({"min_sparsity": -0.1}, r"^min_sparsity must be a number in \[0, 1\)"),
    ({"min_sparsity": True}, r"^min_sparsity must be a number in \[0, 1\)"),
    ({"batch_size": 0}, r"^batch_size must be a positive integer, got 0$"),
    ({"repeats": 1.5}, r"^repeats must be a positive integer, got 1\.5$"),
    ({"choose": "sometimes"}, r"^unknown choose 'sometimes'; valid choices: faster, always$"),
    ({"measure": 3}, r"^measure must be a function \(module, input\) -> seconds per call, or None; got int$"),
])
def test_bad_arguments_are_one_line_config_errors(kwargs, message):
    model = pruned_mlp()
    with pytest.raises(ConfigError, match=message):
        bingo.to_sparse(model, **kwargs)
    assert hasattr(model[1], "weight_mask")  # nothing changed


def test_a_model_without_a_linear_is_refused():
    with pytest.raises(ConfigError, match=r"^Sequential has no nn\.Linear \(nor other layer with a sparse form: "
                                          r"Linear, Conv1D\) to convert$"):
        bingo.to_sparse(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()))
    with pytest.raises(ConfigError, match=r"^to_sparse: "):
        bingo.to_sparse(pruned_mlp(), torch.ones(2, 3))  # example inputs the model does not take


def test_copies_pickles_and_state_dicts_of_a_converted_model():
    model = pruned_mlp()
    bingo.to_sparse(model, choose="always")
    x = torch.randn(8, 16)
    expected = model(x)
    torch.testing.assert_close(copy.deepcopy(model)(x), expected)
    torch.testing.assert_close(pickle.loads(pickle.dumps(model))(x), expected)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    assert {"1.weight_crow_indices", "1.weight_col_indices", "1.weight_values", "1.bias"} <= set(model.state_dict())
    # into a model converted from another prune (other entries kept, another count of them)
    other = pruned_mlp(sparsity=0.5, seed=3)
    bingo.to_sparse(other, choose="always")
    assert other[1].weight_values.numel() != model[1].weight_values.numel()
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(other(x), expected)
    assert other[1].weight_col_indices.dtype == torch.int32
    wider = nn.Sequential(nn.Flatten(), SparseLinear(torch.eye(13, 16)))
    with pytest.raises(RuntimeError, match=r"1\.weight_crow_indices has 13 entries; a SparseLinear with 13 output "
                                           r"features takes 14"):
        wider.load_state_dict({k: v for k, v in model.state_dict().items() if k.startswith("1.")}, strict=False)
    broken = {k: v.clone() for k, v in model.state_dict().items()}
    broken["1.weight_col_indices"][0] = 99  # a column the 16 inputs do not have
    with pytest.raises(RuntimeError, match=r"1\.weight_\* do not make a CSR matrix of shape \(12, 16\)"):
        other.load_state_dict(broken)
    model.double()  # dtype and device moves go through the buffers
    assert model[1].weight.dtype == torch.float64 and model[1].weight_col_indices.dtype == torch.int32
    torch.testing.assert_close(model(x.double()), expected.double())


def test_inference_only_the_weight_gets_no_gradient():
    model = pruned_mlp()
    bingo.to_sparse(model, choose="always")
    x = torch.randn(4, 16, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and model[1].bias.grad is not None
    assert not model[1].weight_values.requires_grad and "weight_values" not in dict(model[1].named_parameters())


def test_example_inputs_time_each_layer_on_the_input_it_receives():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down, self.unused = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 16)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    model = Tokens().eval()
    bingo.prune(model, bingo.magnitude_scores(model), sparsity=0.8, scope="layer")
    x = torch.randn(2, 5, 16)
    before = model(x).detach()
    calls: list = []
    result = bingo.to_sparse(model, x, measure=fake_measure({16, 32}, calls))
    assert result.converted == ("up", "down")
    rows = {layer.name: layer for layer in result.layers}
    assert rows["up"].input_shape == (2, 5, 16) and rows["down"].input_shape == (2, 5, 32)
    assert rows["unused"].reason == "not called on the example inputs" and not rows["unused"].converted
    assert {shape for _, _, shape in calls} == {(2, 5, 16), (2, 5, 32)}
    torch.testing.assert_close(model(x), before)


def test_tied_weights_and_attention_outputs_are_left_alone_with_a_reason():
    first, second = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)
    with torch.no_grad():
        first.weight[:, :6] = 0
    second.weight = first.weight
    attention = nn.MultiheadAttention(8, 2)
    with torch.no_grad():
        attention.out_proj.weight[:, :6] = 0
    model = nn.ModuleDict({"a": first, "b": second, "attention": attention, "head": nn.Linear(8, 2)})
    result = bingo.to_sparse(model, choose="always", min_sparsity=0.0)
    assert result.converted == ("head",)
    rows = {layer.name: layer for layer in result.layers}
    assert rows["a"].reason.startswith("its weight is shared with another module (tied)") and rows["b"].reason == rows["a"].reason
    assert rows["attention.out_proj"].reason.startswith("nn.MultiheadAttention reads its out_proj's weight itself")
    assert rows["attention"].reason.startswith("no sparse form is defined for MultiheadAttention")
    assert model["a"] is first and model["b"].weight is first.weight


def test_gpt2s_conv1d_has_a_sparse_form_too():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(12, 16)  # nf=12 outputs, nx=16 inputs; weight stored 16 × 12
    model = nn.Sequential(conv).eval()
    bingo.prune(model, bingo.magnitude_scores(model), sparsity=0.75)
    x = torch.randn(3, 4, 16)
    before = model(x).detach()
    result = bingo.to_sparse(model, choose="always")
    assert result.converted == ("0",) and result.layers[0].kind == "Conv1D"
    assert (model[0].in_features, model[0].out_features) == (16, 12)
    torch.testing.assert_close(model(x), before)


def test_a_layer_no_sparse_kernel_takes_is_kept(monkeypatch):
    def no_kernel(self, input):
        raise NotImplementedError('"addmm_out_sparse_csr_impl_mkl" not implemented for \'Float8_e4m3fn\'')

    monkeypatch.setattr(bingo.SparseLinear, "forward", no_kernel)  # a dtype / device with no CSR product
    model = pruned_mlp()
    result = bingo.to_sparse(model, choose="always")
    assert result.converted == ()
    assert all(isinstance(model[i], nn.Linear) for i in (1, 3, 5))
    assert result.layers[0].reason.startswith("no sparse kernel takes it here (csr: ")
    assert "Float8" in result.layers[0].reason


def test_real_timing_reports_a_ratio_for_every_tried_layer():
    assert forward_seconds(nn.Linear(8, 8), torch.randn(1, 8)) > 0
    model = pruned_mlp()
    x = torch.randn(8, 16)
    before = model(x).detach()
    result = bingo.to_sparse(model, repeats=2)
    assert result.device == "cpu" and result.choose == "faster"
    for layer in result.layers:
        if layer.kind == "Linear":
            assert layer.speedup > 0 and layer.converted == (layer.speedup > 1.0)
            assert layer.speedup_range[0] <= layer.speedup <= layer.speedup_range[1]
    torch.testing.assert_close(model(x), before)  # whatever it chose


@pytest.mark.cuda
def test_on_cuda_layers_are_timed_and_converted_on_the_models_device():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 16)).cuda().eval()
    bingo.prune(model, bingo.magnitude_scores(model), sparsity=0.95, scope="layer")
    x = torch.randn(4, 1024, device="cuda")
    with torch.no_grad():
        before = model(x)
    result = bingo.to_sparse(model)
    assert result.device.startswith("cuda")
    assert all(layer.input_shape == (1, layer_width) for layer, layer_width in zip(
        [r for r in result.layers if r.speedup is not None], (1024, 1024)))
    assert all(t.device.type == "cuda" for t in [*model.parameters(), *model.buffers()])
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-4)
    forced = nn.Sequential(nn.Linear(64, 64)).cuda()
    bingo.prune(forced, bingo.magnitude_scores(forced), sparsity=0.9)
    bingo.to_sparse(forced, choose="always")
    assert isinstance(forced[0], SparseLinear) and forced[0].weight.device.type == "cuda"
