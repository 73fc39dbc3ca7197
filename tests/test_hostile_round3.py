"""A third hostile round, on models and training loops not in the repo: each case once gave a wrong result or a raw error."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import bingo


def _mlp(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).to(dtype)


def test_apply_masks_refuses_scores_passed_as_masks():
    model = _mlp()
    before = model[0].weight.detach().clone()
    with pytest.raises(bingo.ConfigError, match=r"^apply_masks: masks\['0.weight'\] is not a keep-mask \(bool, or 0 / 1 values"):
        bingo.apply_masks(model, bingo.magnitude_scores(model))
    assert torch.equal(model[0].weight, before) and not hasattr(model[0], "weight_mask")  # nothing applied
    bingo.apply_masks(model, {"0.weight": (before > 0).float()})  # 0 / 1 floats are masks
    assert torch.equal(model[0].weight, before * (before > 0))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("conv", [False, True])
def test_export_runs_a_float64_or_bfloat16_model_on_the_float32_input_it_declares(tmp_path, dtype, conv):
    torch.manual_seed(0)
    model = (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(16, 3)) if conv else _mlp()).to(dtype).eval()
    shape = (3, 4, 4) if conv else (8,)
    bingo.prune(model, bingo.magnitude_scores(model), sparsity=0.5)
    bingo.export_model(model, preprocess=(0.5, 2.0), input_shape=shape, out_dir=tmp_path / "out")
    program = torch.export.load(tmp_path / "out" / "model.pt2").module()
    raw = torch.randn(2, *shape)
    with torch.no_grad():
        expected = model(((raw - 0.5) / 2.0).to(dtype))
    torch.testing.assert_close(program(raw), expected)


@pytest.mark.parametrize("shape,pattern", [
    ((9,), r"^count_flops: Sequential cannot run on input_shape \(9,\) taken as one sample"),
    (("8",), r"^count_flops: input_shape must be one sample's shape as a tuple of ints"),
])
def test_count_flops_says_when_the_shape_does_not_fit(shape, pattern):
    with pytest.raises(bingo.ConfigError, match=pattern):
        bingo.count_flops(_mlp(), shape)
    assert bingo.count_flops(_mlp(), (8,)) == 8 * 16 + 16 * 3
    assert bingo.count_flops(_mlp(torch.float64), (8,)) == 8 * 16 + 16 * 3  # a float64 model is run in float64


@pytest.mark.parametrize("value,pattern", [
    (float("nan"), r"^prune_to_accuracy: evaluate\(model\) returned nan for the unpruned model; it must be a finite number$"),
    ("0.9?", r"^prune_to_accuracy: evaluate\(model\) must return a number \(higher = better\), got "),
])
def test_prune_to_accuracy_refuses_an_evaluate_that_returns_no_number(value, pattern):
    model = _mlp()
    with pytest.raises(bingo.ConfigError, match=pattern):
        bingo.prune_to_accuracy(model, bingo.magnitude_scores(model), lambda net: value, min_accuracy=0.5)
    assert not hasattr(model[0], "weight_mask")


def test_prune_to_accuracy_takes_a_non_finite_trial_as_below_the_floor():
    model = _mlp()
    calls = []

    def evaluate(net):  # e.g. minus a loss that overflows once too much is pruned
        calls.append(1)
        return 0.9 if len(calls) == 1 else (0.8 if bingo.model_sparsity(net) <= 0.5 else float("-inf"))

    result = bingo.prune_to_accuracy(model, bingo.magnitude_scores(model), evaluate, min_accuracy=0.5)
    assert 0.45 <= bingo.model_sparsity(model) <= 0.5 and result.accuracy == 0.8


def _grouped(groups: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1, groups=groups), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 10)).eval()


def test_channel_groups_leave_out_what_a_grouped_conv_meets_and_shrink_says_what_it_kept():
    model = _grouped(2)
    groups = bingo.channel_groups(model, (3, 8, 8))
    assert [g.members for g in groups] == [("0.weight",)]  # 2 feeds the grouped conv, 4 is one: both left alone
    scores = bingo.magnitude_scores(model, granularity="neuron")
    bingo.prune(model, {k: scores[k] for k in ("0.weight", "2.weight")}, sparsity=0.5, scope="layer")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shrunk = bingo.shrink(model, (3, 8, 8))
    assert [str(w.message) for w in caught] == [
        "shrink kept zero channels a grouped conv meets, which it cannot remove (only groups=1 and depthwise convs "
        "are supported): 8 of '2' (it meets '4' (Conv2d, groups=2))"]
    assert shrunk[0].out_channels == 8 and shrunk[2].out_channels == 16
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(shrunk(x), model(x), atol=1e-5, rtol=1e-5)


def test_shrink_coupled_with_a_grouped_conv_is_exact_not_a_crash():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1, groups=2), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    assert bingo.channel_groups(model, (3, 8, 8)) == []
    bingo.prune(model, {"0.weight": torch.arange(32.0)}, sparsity=0.5, scope="layer")
    with pytest.warns(UserWarning, match=r"16 of '0' \(it meets '2' \(Conv2d, groups=2\)\)"):
        shrunk = bingo.coupled.shrink_coupled(model, (3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(shrunk(x), model(x), atol=1e-5, rtol=1e-5)


def test_depthwise_convs_still_shrink_as_coupled_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                          nn.Conv2d(8, 8, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    groups = bingo.channel_groups(model, (3, 6, 6))
    assert ("0.weight", "2.weight") in [g.members for g in groups]


# ---- training loops (a second reviewer's round) ----

def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 5 * 5, 3))


def _train(model, search, steps=6, inf_at=None, channels_last=False):
    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(steps):
        x, y = torch.randn(8, 2, 5, 5, generator=generator), torch.randint(0, 3, (8,), generator=generator)
        x = x.to(next(model.parameters()).dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if step == inf_at:  # a step whose gradients overflowed: a GradScaler skips optimizer.step
            for p in model.parameters():
                p.grad.fill_(float("inf"))
        else:
            optimizer.step()
        search.step(x, y)
    return search


@pytest.mark.parametrize("config", ["BINGO_SEARCH", "paper"])
def test_a_channels_last_model_searches_as_the_row_major_one(config):
    settings = dict(config=bingo.BINGO_SEARCH, every=2) if config == "BINGO_SEARCH" else dict(every=2, fraction=0.3)
    model = _cnn()
    plain = _train(model, bingo.TicketSearch(model, seed=0, **settings))
    model = _cnn().to(memory_format=torch.channels_last)
    assert not model[0].weight.is_contiguous()
    last = _train(model, bingo.TicketSearch(model, seed=0, **settings), channels_last=True)
    for key, value in plain.significance().items():
        torch.testing.assert_close(last.significance()[key], value, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("granularity", ["weight", "neuron"])
def test_a_step_with_overflowed_gradients_counts_as_a_zero_gradient(granularity, dtype):
    def run(zero: bool):
        model = _cnn().to(dtype)
        search = bingo.TicketSearch(model, estimator="taylor", granularity=granularity, seed=0)
        real_step = search.step

        def step(x, y):
            if zero and search.steps == 2:  # the step after the overflow: its gradients as zeros instead of inf
                for p in model.parameters():
                    p.grad.zero_()
            return real_step(x, y)

        search.step = step
        return _train(model, search, inf_at=2).significance()

    overflowed, zeroed = run(False), run(True)
    for key, value in zeroed.items():
        assert torch.isfinite(overflowed[key]).all(), key
        torch.testing.assert_close(overflowed[key], value, rtol=0, atol=0)


def test_int32_labels_are_labels_for_the_loss_metric():
    x, y = torch.randn(8, 8), torch.randint(0, 3, (8,))
    results = []
    for labels in (y, y.int()):
        model = _mlp()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        search = bingo.TicketSearch(model, config=bingo.BINGO_SEARCH, every=1, seed=0)
        results.append(search.step(x, labels))
    assert results[0] == results[1] and results[0]


@pytest.mark.parametrize("value,what", [(lambda o, t: o.sum(1), r"a tensor of shape \(8,\)"), (lambda o, t: None, "None")])
def test_a_metric_that_returns_no_single_number_says_so(value, what):
    x, y = torch.randn(8, 8), torch.randint(0, 3, (8,))
    search = bingo.TicketSearch(_mlp(), estimator="probe", metric=value, every=1, seed=0)
    with pytest.raises(bingo.ConfigError, match=rf"^a metric must return one number per batch \(higher = better\), got {what}$"):
        search.step(x, y)


def test_a_frozen_layer_under_the_default_search_is_named_as_frozen():
    model = _mlp()
    model[0].weight.requires_grad_(False)
    x, y = torch.randn(8, 8), torch.randint(0, 3, (8,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    search = bingo.TicketSearch(model, config=bingo.BINGO_SEARCH, seed=0)
    with pytest.raises(bingo.ConfigError, match=r"'0.weight', which is frozen \(requires_grad=False\): leave it out of the "
                                                r"search \(exclude=\['0.weight'\]\) or let it train$"):
        search.step(x, y)
    bingo.TicketSearch(model, config=bingo.BINGO_SEARCH, exclude=["0.weight"], seed=0).step(x, y)


@pytest.mark.parametrize("seed,pattern", [(1.5, r"seed must be an integer, got float 1.5"),
                                          (2**70, r"seed must be a whole number in \[-9223372036854775808, 18446744073709551615\]")])
def test_a_search_seed_torch_cannot_take_is_a_one_line_error(seed, pattern):
    with pytest.raises(bingo.ConfigError, match=rf"^SearchConfig: {pattern}"):
        bingo.TicketSearch(_mlp(), seed=seed)


def test_scheduler_refuses_groups_that_are_not_channel_groups_and_a_fractional_step():
    model = _mlp()
    with pytest.raises(bingo.ConfigError, match=r"^SparsityScheduler: groups must be the list bingo.channel_groups"):
        bingo.SparsityScheduler(model, lambda: bingo.magnitude_scores(model), final_sparsity=0.5, start_step=0,
                                end_step=4, frequency=1, groups="x")
    scheduler = bingo.SparsityScheduler(model, lambda: bingo.magnitude_scores(model), final_sparsity=0.5, start_step=0,
                                        end_step=4, frequency=1)
    with pytest.raises(bingo.CheckpointError, match=r"^not a SparsityScheduler state dict"):
        scheduler.load_state_dict({**scheduler.state_dict(), "last_step": 2.7})


def test_compensate_takes_a_transformer_encoder_with_a_padding_mask_in_eval_mode():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Linear(8, 16)
            self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True), 2,
                                             enable_nested_tensor=True)
            self.fc = nn.Linear(16, 3)

        def forward(self, x, mask):
            return self.fc(self.enc(self.emb(x), src_key_padding_mask=mask).mean(1))

    torch.manual_seed(0)
    model = Net().eval()
    x, mask = torch.randn(128, 5, 8), torch.zeros(128, 5, dtype=torch.bool)
    mask[:, -1] = True  # padding: the encoder's fast path would make nested tensors of the activations
    dense = copy.deepcopy(model)
    masks = bingo.prune(model, bingo.magnitude_scores(model), sparsity=0.7)
    result = bingo.compensate(model, masks, (x, mask))
    assert any("self_attn" in k for k in result.layers) and all(result.error_after[k] <= result.error_before[k] for k in result.error_after)
    assert torch.backends.mha.get_fastpath_enabled()  # the global flag is restored
    with torch.no_grad():
        assert torch.isfinite(model(x, mask)).all() and model(x, mask).shape == dense(x, mask).shape


def test_head_scores_name_separate_q_k_v_projections():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.att, self.fc = nn.MultiheadAttention(16, 4, kdim=12, vdim=12, batch_first=True), nn.Linear(16, 3)

    model = Net()
    with pytest.raises(bingo.ConfigError, match=r"^'att' has separate q/k/v projections \(kdim/vdim differ from embed_dim\)"):
        bingo.head_scores(model, bingo.magnitude_scores(model))


def test_channel_groups_leave_a_hugging_face_attention_s_projections_alone():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    groups = bingo.channel_groups(model, {"input_ids": torch.randint(0, 60, (4, 8))})
    members = [key for group in groups for key in group.members]
    assert "bert.encoder.layer.0.intermediate.dense.weight" in members  # the feed-forward's hidden channels: free
    assert not any(".attention.self." in key for key in members)  # q / k / v: tied to the heads


def test_a_compiled_model_is_searched_and_pruned_under_its_own_keys():
    model = _cnn()
    compiled = torch.compile(model, backend="eager")  # the dynamo wrapper without a C++ toolchain
    eager = _cnn()
    searched = _train(compiled, bingo.TicketSearch(compiled, config=bingo.BINGO_SEARCH, every=2, seed=0))
    plain = _train(eager, bingo.TicketSearch(eager, config=bingo.BINGO_SEARCH, every=2, seed=0))
    assert list(searched.significance()) == ["0.weight", "2.weight", "5.weight"]  # not "_orig_mod.0.weight"
    for key, value in plain.significance().items():
        torch.testing.assert_close(searched.significance()[key], value)
    masks = bingo.prune(compiled, searched.significance(), sparsity=0.5)
    assert set(masks) == {"0.weight", "2.weight", "5.weight"} and hasattr(model[0], "weight_mask")


def test_loading_a_pruned_state_keeps_the_parameter_order_an_optimizer_state_relies_on():
    pruned = _mlp()
    bingo.prune(pruned, bingo.magnitude_scores(pruned), sparsity=0.5)
    fresh = _mlp()
    bingo.load_pruned_state_dict(fresh, pruned.state_dict())
    # weight_orig where weight was (torch.nn.utils.prune alone would list it after the bias), in both
    dense_order = ["0.weight_orig", "0.bias", "2.weight_orig", "2.bias"]
    assert [n for n, _ in pruned.named_parameters()] == [n for n, _ in fresh.named_parameters()] == dense_order
    # so an optimizer state saved from the pruned model lands on the same tensors of the reloaded one
    optimizer = torch.optim.Adam(pruned.parameters())
    torch.nn.functional.cross_entropy(pruned(torch.randn(4, 8)), torch.tensor([0, 1, 2, 0])).backward()
    optimizer.step()
    resumed = torch.optim.Adam(fresh.parameters())
    resumed.load_state_dict(optimizer.state_dict())
    torch.nn.functional.cross_entropy(fresh(torch.randn(4, 8)), torch.tensor([0, 1, 2, 0])).backward()
    resumed.step()  # would raise on moments of a (16,) bias given to a (16, 8) weight


def test_a_compiled_model_s_wrapper_keys_are_named_as_such():
    compiled = torch.compile(_mlp(), backend="eager")
    with pytest.raises(bingo.ConfigError, match=r"^score key '_orig_mod.0.weight' names the wrapper's parameter: keys name "
                                                r"the inner module's \('0.weight'"):
        bingo.prune(compiled, {"_orig_mod.0.weight": torch.rand(16, 8)}, sparsity=0.5)


def test_a_cached_masks_block_in_one_thread_leaves_another_thread_s_forwards_alone():
    import threading

    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    bingo.apply_masks(layer, {"weight": torch.rand(4, 6) > 0.5})
    x, seen = torch.randn(2, 6), {}
    inside, written = threading.Event(), threading.Event()

    def other():
        inside.wait()
        with torch.no_grad():
            layer(x)
            layer.weight_orig.data.mul_(0)  # outside any block of its own: allowed, and must be seen
            seen["out"] = layer(x)
        written.set()

    thread = threading.Thread(target=other)
    thread.start()
    with torch.no_grad(), bingo.cached_masks():
        inside.set()
        written.wait(10)
    thread.join()
    torch.testing.assert_close(seen["out"], layer.bias.detach().expand(2, -1))
