"""Tests for bingo.shrink: physically removing pruned units.

The central invariant: in eval mode the shrunk model computes what the masked
model computes (to float rounding), while its layers really are smaller. It
is checked on plain MLPs and CNNs, with BatchNorm statistics and activations
chosen so that a pruned unit's constant output is *not* zero (the case that
needs folding into the next bias), and on the project's three models.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bingo
from bingo import ConfigError, count_flops, count_parameters, magnitude_scores, shrink
from bingo.bench.models import build_model

from conftest import make_cnn, make_mlp


def randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm running stats and affine parameters far from their defaults.

    With the defaults (mean 0, var 1, gamma 1, beta 0) a zeroed unit stays 0
    after the BatchNorm, which would hide a missing fold.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.copy_(torch.rand(n, generator=generator) * 2 - 1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(n, generator=generator) * 2 - 0.5)
    return model


def neuron_pruned(model: nn.Module, sparsity: float = 0.5) -> nn.Module:
    bingo.prune(model, magnitude_scores(model, "neuron"), sparsity)
    return model.eval()


def assert_same_outputs(masked: nn.Module, shrunk: nn.Module, shape: tuple[int, ...], atol: float = 1e-5) -> None:
    x = torch.randn(23, *shape, generator=torch.Generator().manual_seed(5)) * 2
    with torch.no_grad():
        expected, got = masked.eval()(x), shrunk.eval()(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=atol, rtol=1e-5)


def units(module: nn.Module) -> int:
    return module.weight.shape[0]


def kept_units(masked_module: nn.Module) -> int:
    return int(masked_module.weight_mask.reshape(masked_module.weight_mask.shape[0], -1).any(dim=1).sum())


# --------------------------------------------------------------------------
# equivalence and sizes
# --------------------------------------------------------------------------


def test_mlp_shrinks_to_the_surviving_units_and_computes_the_same():
    masked = neuron_pruned(make_mlp(), 0.5)
    n1, n2 = kept_units(masked[1]), kept_units(masked[3])
    assert n1 < 12 and n2 < 8
    shrunk = shrink(masked)
    assert (shrunk[1].in_features, shrunk[1].out_features) == (16, n1)
    assert (shrunk[3].in_features, shrunk[3].out_features) == (n1, n2)
    assert (shrunk[5].in_features, shrunk[5].out_features) == (n2, 4)
    assert count_parameters(shrunk) == 16 * n1 + n1 + n1 * n2 + n2 + n2 * 4 + 4
    assert_same_outputs(masked, shrunk, (16,))


def test_the_input_model_is_untouched_and_the_result_is_plain():
    masked = neuron_pruned(make_mlp(), 0.5)
    before = {k: v.clone() for k, v in masked.state_dict().items()}
    shrunk = shrink(masked)
    after = masked.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert hasattr(masked[1], "weight_mask")
    assert not any(name.endswith(("_orig", "_mask")) for name in shrunk.state_dict())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in shrunk.modules())
    assert all(type(m.weight) is nn.Parameter for m in shrunk.modules() if isinstance(m, nn.Linear))


def test_cnn_with_batchnorm_folds_the_constant_of_pruned_units():
    # Conv -> BN -> ReLU -> Dropout -> Flatten -> Linear -> BN1d -> ReLU -> Dropout -> Linear.
    masked = neuron_pruned(randomise_norms(make_cnn()), 0.5)
    conv, bn, fc, bn1d = masked[0], masked[1], masked[5], masked[6]
    dead = ~conv.weight_mask.reshape(4, -1).any(dim=1)
    constant = F.relu(bn.bias - bn.weight * bn.running_mean / torch.sqrt(bn.running_var + bn.eps))
    assert dead.any() and (constant[dead] != 0).any(), "the test needs a pruned channel with a nonzero constant"
    shrunk = shrink(masked)
    c_kept, f_kept = kept_units(conv), kept_units(fc)
    assert (shrunk[0].out_channels, shrunk[1].num_features) == (c_kept, c_kept)
    assert (shrunk[5].in_features, shrunk[5].out_features) == (c_kept * 16, f_kept)  # 4x4 map per channel
    assert (shrunk[6].num_features, shrunk[9].in_features) == (f_kept, f_kept)
    keep = ~dead
    torch.testing.assert_close(shrunk[1].running_mean, bn.running_mean[keep])
    torch.testing.assert_close(shrunk[1].running_var, bn.running_var[keep])
    torch.testing.assert_close(shrunk[6].running_var, bn1d.running_var[bn1d.running_var.new_ones(16).bool() & fc.weight_mask.any(1).bool()])
    assert not torch.equal(shrunk[5].bias, fc.bias[fc.weight_mask.any(1).bool()]), "the constant was not folded"
    assert_same_outputs(masked, shrunk, (1, 4, 4))


def test_without_the_fold_the_outputs_would_differ():
    # Guards the test above: dropping the constant channel's contribution is visibly wrong.
    masked = neuron_pruned(randomise_norms(make_cnn()), 0.5)
    shrunk = shrink(masked)
    fc, kept = masked[5], masked[5].weight_mask.any(1).bool()
    broken = copy.deepcopy(shrunk)
    with torch.no_grad():
        broken[5].bias.copy_(fc.bias[kept])
    x = torch.randn(8, 1, 4, 4)
    assert not torch.allclose(broken.eval()(x), masked(x), atol=1e-3)


@pytest.mark.parametrize("act", [nn.Sigmoid, nn.Tanh, nn.GELU, nn.ReLU])
def test_activations_with_nonzero_value_at_zero_are_folded(act):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(10, 20), act(), nn.Linear(20, 15), act(), nn.Linear(15, 3))
    masked = neuron_pruned(model, 0.6)
    shrunk = shrink(masked)
    assert shrunk[0].out_features == kept_units(masked[0]) < 20
    assert_same_outputs(masked, shrunk, (10,))


def two_conv_net(padding: int, padding_mode: str = "zeros") -> nn.Module:
    torch.manual_seed(4)
    return nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=padding, padding_mode=padding_mode), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    )


def constant_channels(masked: nn.Module) -> int:
    conv, bn = masked[0], masked[1]
    dead = ~conv.weight_mask.reshape(conv.out_channels, -1).any(dim=1)
    constant = F.relu(bn.bias - bn.weight * bn.running_mean / torch.sqrt(bn.running_var + bn.eps))
    return int((dead & (constant != 0)).sum())


def test_zero_padded_conv_keeps_one_carrier_channel_and_is_exact_at_the_borders():
    masked = neuron_pruned(randomise_norms(two_conv_net(padding=1)), 0.5)
    assert constant_channels(masked) >= 2, "the test needs several pruned channels with nonzero constants"
    shrunk = shrink(masked)
    assert shrunk[0].out_channels == kept_units(masked[0]) + 1  # one carrier for all constant channels
    assert shrunk[3].in_channels == shrunk[0].out_channels
    assert int((shrunk[0].weight.reshape(shrunk[0].out_channels, -1) == 0).all(dim=1).sum()) == 1
    assert_same_outputs(masked, shrunk, (2, 7, 5))  # odd sizes: borders everywhere


@pytest.mark.parametrize("padding, mode", [(0, "zeros"), (1, "reflect"), (1, "replicate"), (1, "circular")])
def test_conv_without_zero_padding_folds_into_the_bias(padding, mode):
    masked = neuron_pruned(randomise_norms(two_conv_net(padding, mode)), 0.5)
    assert constant_channels(masked) >= 1
    shrunk = shrink(masked)
    assert shrunk[0].out_channels == kept_units(masked[0])  # no carrier needed
    assert_same_outputs(masked, shrunk, (2, 7, 6))


def test_conv1d_chain():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv1d(3, 10, 3), nn.BatchNorm1d(10), nn.Sigmoid(), nn.MaxPool1d(2),
                          nn.Conv1d(10, 8, 3, padding=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8, 2))
    masked = neuron_pruned(randomise_norms(model), 0.5)
    shrunk = shrink(masked)
    assert shrunk[0].out_channels == kept_units(masked[0]) + 1  # sigmoid: every dead channel is constant; one carrier
    assert shrunk[4].out_channels == kept_units(masked[4])
    assert_same_outputs(masked, shrunk, (3, 14))


@pytest.mark.parametrize("name", ["lenet300", "mlp", "conv"])
def test_project_models(name):
    shape = (1, 8, 8)
    model = randomise_norms(build_model(name, shape, 10, seed=1))
    masked = neuron_pruned(model, 0.6)
    shrunk = shrink(masked, input_shape=shape)
    assert type(shrunk) is type(masked)
    assert count_parameters(shrunk) < 0.75 * count_parameters(masked)
    assert count_flops(shrunk, shape) < count_flops(masked, shape)
    assert_same_outputs(masked, shrunk, shape)
    if name == "conv":  # the model's own (N, H, W) branch still works
        x = torch.randn(4, 8, 8)
        torch.testing.assert_close(shrunk(x), masked(x), atol=1e-5, rtol=1e-5)


def test_conv_model_needs_input_shape_for_its_control_flow():
    masked = neuron_pruned(build_model("conv", (1, 8, 8), 10), 0.5)
    with pytest.raises(ConfigError, match=r"cannot follow ConvNet\.forward with torch\.fx .*pass input_shape="):
        shrink(masked)


def test_lenet300_counts_match_the_kept_units():
    masked = neuron_pruned(build_model("lenet300", (1, 28, 28), 10), 0.7)
    n1, n2 = kept_units(masked.fc1), kept_units(masked.fc2)
    assert n1 + n2 == round(0.3 * 400)  # sparsity = fraction of the 400 hidden units removed
    shrunk = shrink(masked)
    assert (units(shrunk.fc1), units(shrunk.fc2), units(shrunk.fc3)) == (n1, n2, 10)
    assert count_parameters(shrunk) == 784 * n1 + n1 + n1 * n2 + n2 + n2 * 10 + 10
    assert count_flops(shrunk, (1, 28, 28)) == 784 * n1 + n1 * n2 + n2 * 10


# --------------------------------------------------------------------------
# output units, unmasked zeros, functional forward
# --------------------------------------------------------------------------


def test_output_units_are_never_removed():
    model = make_mlp()
    scores = magnitude_scores(model, "neuron")
    assert "5.weight" not in scores  # neuron scores leave the output layer out
    masked = neuron_pruned(model, 0.5)
    with torch.no_grad():  # even an output unit with all-zero weights stays: it is a class
        masked[5].weight[1] = 0
        masked[5].bias[1] = 0
    shrunk = shrink(masked)
    assert shrunk[5].out_features == 4
    assert_same_outputs(masked, shrunk, (16,))


def test_plain_model_with_zero_rows_shrinks_without_masks():
    model = make_mlp().eval()
    with torch.no_grad():
        model[1].weight[[0, 3, 7]] = 0  # bias kept: those units output their bias, a constant
    shrunk = shrink(model)
    assert shrunk[1].out_features == 9 and shrunk[3].in_features == 9
    assert_same_outputs(model, shrunk, (16,))


def test_weight_level_pruning_without_dead_units_keeps_every_layer_size():
    model = make_mlp()
    bingo.prune(model, magnitude_scores(model), 0.3)
    shrunk = shrink(model)
    assert [m.weight.shape for m in shrunk if isinstance(m, nn.Linear)] == [m.weight.shape for m in model if isinstance(m, nn.Linear)]
    assert_same_outputs(model, shrunk, (16,))


class Functional(nn.Module):
    """A non-Sequential model written with functional ops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3)
        self.fc1 = nn.Linear(6 * 2 * 2, 12)
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x):
        x = F.max_pool2d(torch.sigmoid(self.conv(x)), 2)
        x = x.view(x.size(0), -1)
        return self.fc2(F.leaky_relu(self.fc1(x), 0.2)).log_softmax(dim=1)


def test_functional_forward_is_followed_with_fx():
    torch.manual_seed(7)
    masked = neuron_pruned(Functional(), 0.5)
    shrunk = shrink(masked)
    assert shrunk.conv.out_channels == kept_units(masked.conv)
    assert shrunk.fc1.in_features == 4 * kept_units(masked.conv)
    assert_same_outputs(masked, shrunk, (1, 6, 6))


def test_twice_is_the_same_as_once():
    masked = neuron_pruned(randomise_norms(make_cnn()), 0.5)
    once = shrink(masked)
    twice = shrink(once)
    assert count_parameters(twice) == count_parameters(once)
    assert_same_outputs(masked, twice, (1, 4, 4))


def test_shrunk_model_is_smaller_and_trains():
    masked = neuron_pruned(randomise_norms(make_cnn()), 0.5)
    channels, hidden = kept_units(masked[0]), kept_units(masked[5])
    assert channels < 4 and hidden < 16
    shrunk = shrink(masked).train()
    # Really smaller: plain parameters cut to the surviving units, the next layer's input with them.
    assert {name: tuple(p.shape) for name, p in shrunk.named_parameters()} == {
        "0.weight": (channels, 1, 3, 3), "0.bias": (channels,), "1.weight": (channels,), "1.bias": (channels,),
        "5.weight": (hidden, channels * 4 * 4), "5.bias": (hidden,), "6.weight": (hidden,), "6.bias": (hidden,),
        "9.weight": (3, hidden), "9.bias": (3,),
    }
    assert count_parameters(shrunk) < count_parameters(masked)
    # Still trains: a gradient reaches every parameter, and a step on the batch lowers its loss.
    x, y = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(3)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])

    def loss() -> torch.Tensor:
        torch.manual_seed(0)  # the same dropout masks before and after the step
        return F.cross_entropy(shrunk(x), y)

    before = loss()
    before.backward()
    for name, p in shrunk.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
    torch.optim.SGD(shrunk.parameters(), lr=0.1).step()
    with torch.no_grad():
        assert float(loss()) < float(before.detach())


def test_avg_pool_counting_padding_keeps_nonconstant_units_with_a_warning():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(1, 6, 3), nn.Sigmoid(), nn.AvgPool2d(2, padding=1),
                          nn.Flatten(), nn.Linear(6 * 2 * 2, 2))
    masked = neuron_pruned(model, 0.5)
    with pytest.warns(UserWarning, match=r"shrink kept 3 pruned unit\(s\) of '0'.*not spatially uniform after '2' \(AvgPool2d\)"):
        shrunk = shrink(masked)
    assert shrunk[0].out_channels == 6
    assert_same_outputs(masked, shrunk, (1, 5, 5))


# --------------------------------------------------------------------------
# refusals
# --------------------------------------------------------------------------


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.out(torch.relu(self.fc2(h)) + h)


class Concat(Residual):
    def forward(self, x):
        return self.out(torch.cat([self.fc1(x)[:, :4], self.fc2(x)[:, :4]], dim=1))


class Twice(Residual):
    def forward(self, x):
        return self.out(self.fc1(torch.relu(self.fc1(x))))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return x + self.fc(x)


class Split(Residual):
    def forward(self, x):
        h = self.fc1(x)
        return self.out(nn.functional.relu(h) + torch.sigmoid(h))


class Scaled(Residual):
    def forward(self, x):
        return self.out(self.fc2(self.fc1(x) * 2))


def test_refuses_a_residual_connection():
    model = neuron_pruned(Residual(), 0.3)
    with pytest.raises(ConfigError, match=r"^cannot shrink Residual: the outputs of 'fc1' and 'fc2' meet at node 'add' \(add\); shrink follows "
                                          r"a single chain of layers \(no residual adds, concatenations or branches\); "
                                          r"given input_shape \(one sample's shape, e.g\. shrink\(model, \(1, 28, 28\)\)\), "
                                          r"shrink follows channels tied by residual adds and branches too$"):
        shrink(model)
    shrunk = shrink(model, (8,))  # as the message says: given input_shape, the residual network shrinks
    x = torch.randn(4, 8)
    torch.testing.assert_close(shrunk.eval()(x), model.eval()(x), atol=1e-6, rtol=1e-5)


def test_refuses_concatenation_reuse_and_unknown_ops():
    with pytest.raises(ConfigError, match=r"^cannot shrink Concat: the outputs of 'fc1' and 'fc2' meet at node 'cat' \(torch\.cat\); "):
        shrink(Concat())
    with pytest.raises(ConfigError, match=r"'fc1' \(Linear\) is used more than once in forward"):
        shrink(Twice())
    with pytest.raises(ConfigError, match=r"node 'mul' \(mul\) between 'fc1' and 'fc2' is not supported"):
        shrink(Scaled())
    with pytest.raises(ConfigError, match=r"^cannot shrink Sequential: the outputs of '0' and '1\.fc' meet at node 'add' \(add\) in '1' \(Block\); "):
        shrink(nn.Sequential(nn.Linear(4, 8), Block(), nn.Linear(8, 2)))
    with pytest.raises(ConfigError, match=r"^cannot shrink Block: the input and the output of 'fc' meet at node 'add' \(add\); "):
        shrink(Block())
    with pytest.raises(ConfigError, match=r"^cannot shrink Split: node 'add' \(add\) takes 2 tensor inputs, all branching from the output of 'fc1'; "):
        shrink(Split())


def test_refuses_grouped_conv_and_norm_without_running_stats():
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match=r"'0' \(Conv2d\) is a grouped conv \(groups=2\)"):
        shrink(grouped)
    stateless = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, track_running_stats=False), nn.Linear(6, 2))
    assert count_parameters(shrink(stateless)) == count_parameters(stateless)  # nothing to fold: fine
    with torch.no_grad():
        stateless[0].weight[2] = 0
    with pytest.raises(ConfigError, match=r"'1' \(BatchNorm1d\): it has no running statistics"):
        shrink(stateless)


def test_refuses_linear_on_conv_output_without_flatten():
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Linear(4, 2))  # Linear over the length axis
    with pytest.raises(ConfigError, match=r"Linear '2' takes the output of conv '0' without a flatten"):
        shrink(model)


# --------------------------------------------------------------------------
# counting
# --------------------------------------------------------------------------


def test_count_parameters_stored_and_nonzero():
    model = make_mlp()
    dense = 16 * 12 + 12 + 12 * 8 + 8 + 8 * 4 + 4
    assert count_parameters(model) == dense
    bingo.prune(model, magnitude_scores(model), 0.5)
    assert count_parameters(model) == dense  # masks keep full-size tensors
    weights = 16 * 12 + 12 * 8 + 8 * 4
    assert count_parameters(model, nonzero=True) == dense - round(0.5 * weights)


def test_count_flops_by_hand():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    conv_macs = (4 * 5 * 5) * (2 // 2) * 9
    assert count_flops(model, (2, 5, 5)) == conv_macs + 100 * 3
    assert count_flops(build_model("lenet300", (1, 28, 28), 10), (1, 28, 28)) == 784 * 300 + 300 * 100 + 100 * 10
    assert model.training  # flags restored
