"""GPT-2 end to end, through the public API as a user writes it: search, prune, compensate, the Trainer callback.

A tiny ``transformers.GPT2LMHeadModel`` built from a config (no download),
trained a few hundred steps on a synthetic language (a fixed random Markov
chain) with the search attached. GPT-2's blocks are
``transformers.pytorch_utils.Conv1D`` (an affine layer whose weight is stored
``in × out``), and its ``lm_head`` shares one parameter with the token
embedding ``transformer.wte``.
"""

from __future__ import annotations

import copy
import importlib
import json
import math
import re
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

import bingo  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
VOCAB, LENGTH, WIDTH, LAYERS = 64, 16, 16, 2
#: every Conv1D weight of the blocks, in model order: what the default search must score
BLOCK_WEIGHTS = [f"transformer.h.{i}.{name}.weight" for i in range(LAYERS) for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
#: the two names of the one tied matrix
TIED = ("lm_head.weight", "transformer.wte.weight")


def _chain(seed: int = 0) -> torch.Tensor:
    """A first-order Markov chain over VOCAB tokens: 4 random successors per token, Dirichlet(1) weights."""
    generator = torch.Generator().manual_seed(seed)
    chain = torch.zeros(VOCAB, VOCAB)
    for token in range(VOCAB):
        weights = -torch.rand(4, generator=generator).log()
        chain[token, torch.randperm(VOCAB, generator=generator)[:4]] = weights / weights.sum()
    return chain


def _sequences(chain: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.empty(n, LENGTH, dtype=torch.long)
    tokens[:, 0] = torch.randint(VOCAB, (n,), generator=generator)
    for t in range(1, LENGTH):
        tokens[:, t] = torch.multinomial(chain[tokens[:, t - 1]], 1, generator=generator)[:, 0]
    return tokens


def _gpt2(seed: int = 0) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=WIDTH, n_layer=LAYERS, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def _train(model, tokens, steps, search=None, batch_size=32):
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        rows = torch.randint(len(tokens), (batch_size,), generator=generator)
        batch = {"input_ids": tokens[rows], "labels": tokens[rows]}
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if search is not None:
            search.step(lambda m: m(**batch).loss)
    model.eval()
    return model


@torch.no_grad()
def _loss(model, tokens) -> float:
    """Mean next-token cross-entropy (log perplexity) on ``tokens``."""
    model.eval()
    return float(model(input_ids=tokens, labels=tokens).loss)


def _effective(module: torch.nn.Module) -> torch.Tensor:
    """The weight ``module``'s forward uses now (masked, if a mask is on it)."""
    return getattr(module, "weight").detach()


@pytest.fixture(scope="module")
def corpus():
    chain = _chain()
    return {"train": _sequences(chain, 2048, seed=1), "held_out": _sequences(chain, 256, seed=2)}


@pytest.fixture(scope="module")
def trained(corpus):
    """A tiny GPT-2 trained 300 steps with bingo's default search (never modified: tests prune copies)."""
    model = _gpt2()
    search = bingo.TicketSearch(model, estimator="hybrid", metric="loss", mode="zero", every=None, seed=0)
    _train(model, corpus["train"], 300, search)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "hybrid calibration did not engage": not what these tests are about
        scores = bingo.combine_ranks([search.significance(), bingo.magnitude_scores(model)])
    return model, search, scores


def test_the_model_learns_the_language(trained, corpus):
    # the fixture's model is worth pruning: far below the uniform perplexity
    model, _, _ = trained
    assert math.exp(_loss(model, corpus["held_out"])) < VOCAB / 8


@pytest.mark.filterwarnings("ignore:hybrid calibration did not engage")
def test_default_search_scores_every_conv1d_of_the_blocks_and_not_the_tied_matrix(trained):
    model, search, _ = trained
    conv1d = [f"{name}.weight" for name, module in model.named_modules() if isinstance(module, Conv1D)]
    assert conv1d == BLOCK_WEIGHTS  # the test's own premise: these are all of GPT-2's Conv1D weights
    assert [key for key in BLOCK_WEIGHTS if key not in search.layers] == [], "Conv1D weights the default search does not score"
    assert [key for key in TIED if key in search.layers] == [], "the tied lm_head / wte matrix must not be scored by default"
    assert set(search.layers) == set(BLOCK_WEIGHTS)
    significance = search.significance()
    assert set(significance) == set(BLOCK_WEIGHTS)
    for key in BLOCK_WEIGHTS:
        weight = model.get_parameter(key)
        score = significance[key]
        assert score.shape == weight.shape  # Conv1D's own in × out layout
        assert bool(torch.isfinite(score).all()) and 0.0 <= float(score.min()) <= float(score.max()) <= 1.0
        assert float(score.std()) > 0.0  # something was learned about every block weight, not a constant


def test_default_coverage_counts_every_parameter_once_and_says_the_tied_matrix_is_left_out(trained):
    model, search, _ = trained
    coverage = search.coverage()
    assert coverage.tensors == len(BLOCK_WEIGHTS)
    assert coverage.scored == sum(model.get_parameter(key).numel() for key in BLOCK_WEIGHTS)
    # model.parameters() yields a tied parameter once; so must the total
    assert coverage.total == sum(p.numel() for p in model.parameters())
    assert coverage.scored + sum(coverage.unscored.values()) == coverage.total
    tied = {kind: count for kind, count in coverage.unscored.items() if "tied" in kind}
    assert tied, f"coverage does not say the tied matrix is left out: {coverage}"
    assert sum(tied.values()) == model.transformer.wte.weight.numel()


@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_prune_removes_exactly_that_share_of_the_block_weights_and_leaves_the_embedding(trained, sparsity):
    model, _, scores = trained
    pruned = copy.deepcopy(model)
    masks = bingo.prune(pruned, scores, sparsity=sparsity)
    assert set(masks) == set(BLOCK_WEIGHTS)
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(sparsity * total)
    pruned(input_ids=torch.zeros(1, LENGTH, dtype=torch.long))  # torch's prune hooks refresh the masked weights
    for key, mask in masks.items():
        module = pruned.get_submodule(key.rpartition(".")[0])
        assert isinstance(module, Conv1D)
        assert bool((_effective(module)[~mask] == 0).all())  # what the forward uses is masked
        assert torch.equal(_effective(module)[mask], model.get_parameter(key).detach()[mask])
    assert torch.equal(pruned.transformer.wte.weight, model.transformer.wte.weight)  # nothing leaked into the tied matrix
    assert pruned.lm_head.weight.data_ptr() == pruned.transformer.wte.weight.data_ptr()  # still tied


@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_compensate_refits_every_pruned_conv1d_and_the_held_out_loss_is_not_worse(trained, corpus, sparsity):
    model, _, scores = trained
    pruned = copy.deepcopy(model)
    masks = bingo.prune(pruned, scores, sparsity=sparsity)
    uncompensated = _loss(pruned, corpus["held_out"])  # (a forward: the masked weights are current)
    assert uncompensated > _loss(model, corpus["held_out"])  # the prune did damage, so there is something to repair
    c_attn = [_effective(pruned.transformer.h[i].attn.c_attn).clone() for i in range(LAYERS)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = bingo.compensate(pruned, masks, {"input_ids": corpus["train"][:128]})  # model(**calibration)
    assert list(result.skipped) == []
    assert [str(w.message) for w in caught if "compensate" in str(w.message)] == []
    assert set(result.layers) == set(BLOCK_WEIGHTS)  # every pruned Conv1D, the fused q/k/v c_attn included
    for key in BLOCK_WEIGHTS:  # a least-squares fit on the calibration inputs cannot end further from the dense outputs
        assert result.error_after[key] <= result.error_before[key] * (1 + 1e-6), key
    pruned(input_ids=torch.zeros(1, LENGTH, dtype=torch.long))  # torch's prune hooks refresh the masked weights
    for i, before in enumerate(c_attn):  # c_attn's q, k and v output blocks are each re-fitted, unless pruned away whole
        after = _effective(pruned.transformer.h[i].attn.c_attn)
        kept = masks[f"transformer.h.{i}.attn.c_attn.weight"]
        for name, block in zip("qkv", torch.arange(3 * WIDTH).chunk(3)):
            if kept[:, block].any():
                assert bool((after[:, block] != before[:, block]).any()), f"layer {i}: the {name} block of c_attn was not re-fitted"
    current = bingo.current_masks(pruned, masks)
    assert all(torch.equal(current[k], masks[k]) for k in masks)  # masks unchanged
    for key, mask in masks.items():
        assert bool((_effective(pruned.get_submodule(key.rpartition(".")[0]))[~mask] == 0).all())
    assert torch.equal(pruned.transformer.wte.weight, model.transformer.wte.weight)  # the tied matrix untouched
    compensated = _loss(pruned, corpus["held_out"])
    assert compensated <= uncompensated, f"held-out loss {compensated:.4f} compensated vs {uncompensated:.4f} without"


def test_the_tied_matrix_included_is_one_key_with_one_mask(corpus):
    model = _gpt2(seed=1)
    include = ["transformer.h.*", "lm_head", "transformer.wte"]  # the blocks and the tied matrix, by either of its names
    search = bingo.TicketSearch(model, estimator="hybrid", metric="loss", mode="zero", every=None, seed=0, include=include)
    _train(model, corpus["train"], 20, search)
    tied = [key for key in search.layers if key in TIED]
    assert len(tied) == 1, f"the tied matrix has {len(tied)} keys: {tied}"
    [key] = tied
    assert set(search.layers) == {*BLOCK_WEIGHTS, key}
    coverage = search.coverage()
    assert coverage.total == sum(p.numel() for p in model.parameters())
    assert coverage.scored == sum(model.get_parameter(k).numel() for k in search.layers)  # the tied matrix once
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = bingo.combine_ranks([search.significance(), bingo.magnitude_scores(model, include=include)])
    assert set(scores) == set(search.layers)
    masks = bingo.prune(model, scores, sparsity=0.5)
    assert set(masks) == set(search.layers)
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.5 * total)
    # One parameter, one mask: the embedding lookup and the output layer use the same masked matrix.
    embedding = model.transformer.wte(torch.arange(VOCAB)).detach()  # (vocab, width): every row of the matrix
    output = model.lm_head(torch.eye(WIDTH)).detach().T  # (vocab, width): lm_head has no bias
    assert torch.equal(embedding, output)
    assert torch.equal(embedding == 0, ~masks[key])
    assert 0 < int((~masks[key]).sum()) < masks[key].numel()


def test_trainer_callback_searches_prunes_and_compensates_gpt2(tmp_path, corpus):
    from bingo.integrations.transformers import BingoTrainerCallback

    class Sequences(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 256

        def __getitem__(self, i: int) -> dict:
            return {"input_ids": corpus["train"][i], "labels": corpus["train"][i]}

    model = _gpt2()
    callback = BingoTrainerCallback(sparsity=0.5, calibration={"input_ids": corpus["train"][:64]})
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=24, per_device_train_batch_size=16, learning_rate=3e-3, seed=0,
        use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Sequences(), callbacks=[callback])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    session = callback.session
    assert session.search.steps == trainer.state.global_step == 24
    assert set(session.search.layers) == set(BLOCK_WEIGHTS)
    assert set(session.masks) == set(BLOCK_WEIGHTS)
    total = sum(m.numel() for m in session.masks.values())
    assert sum(int((~m).sum()) for m in session.masks.values()) == round(0.5 * total)
    assert session.compensation is not None
    # every block weight was re-fitted, or re-fitted and put back where the fit did worse on held-out samples
    assert set(session.compensation.layers) | set(session.compensation.unchanged) == set(BLOCK_WEIGHTS)
    assert len(session.compensation.layers) >= len(BLOCK_WEIGHTS) // 2
    assert list(session.compensation.skipped) == []
    assert [str(w.message) for w in caught if "compensate" in str(w.message) and "left some weights as they were" not in str(w.message)] == []
    assert bool((model.transformer.wte.weight != 0).all())  # the tied matrix was not pruned
    model(input_ids=corpus["held_out"][:1])
    for key, mask in session.masks.items():
        assert bool((_effective(model.get_submodule(key.rpartition(".")[0]))[~mask] == 0).all())
    assert math.isfinite(_loss(model, corpus["held_out"]))


def test_conv1d_compensation_is_the_least_squares_fit_in_its_in_by_out_layout():
    """Hand-checked on one GPT-2 ``Conv1D``: each output column re-fitted on its kept inputs, as ``torch.linalg.lstsq`` does."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(Conv1D(nf=4, nx=6))
    with torch.no_grad():
        model[0].bias.normal_()
    dense_weight, dense_bias = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    x = torch.randn(40, 3, 6)  # 40 sequences of 3 positions: every position is a sample of the fit
    masks = bingo.prune(model, bingo.magnitude_scores(model), sparsity=0.5)
    [key] = masks
    assert key == "0.weight"
    keep = masks[key]  # (in, out) = (6, 4), like the weight
    result = bingo.compensate(model, masks, x, damping=0.0)
    assert list(result.layers) == [key] and list(result.skipped) == []
    rows = x.reshape(-1, 6).double()
    targets = rows @ dense_weight.double() + dense_bias.double()
    model(x[:1])  # torch's prune hook refreshes the masked weight
    fitted_weight, fitted_bias = model[0].weight.detach().double(), model[0].bias.detach().double()
    for j in range(4):  # output unit j is column j of the in × out weight
        kept = keep[:, j]
        design = torch.cat([rows[:, kept], torch.ones(len(rows), 1, dtype=torch.float64)], dim=1)
        expected = torch.linalg.lstsq(design, targets[:, j : j + 1]).solution[:, 0]
        torch.testing.assert_close(fitted_weight[kept, j], expected[:-1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fitted_bias[j], expected[-1], atol=1e-4, rtol=1e-4)
    assert bool((model[0].weight.detach()[~keep] == 0).all())


# -- the examples, run with tiny settings ---------------------------------------------------


@pytest.fixture
def examples(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.chdir(tmp_path)  # an example writes nothing where it runs but what it is asked to
    return tmp_path


def test_gpt2_prune_example_runs(examples, capsys):
    example = importlib.import_module("gpt2_prune")
    out = examples / "gpt2.json"
    summary = example.main(["--steps", "30", "--width", "32", "--heads", "2", "--train-sequences", "512",
                            "--calibration-sequences", "64", "--json", str(out)])
    printed = capsys.readouterr().out.strip().splitlines()
    number = r"\d+\.\d\d"
    assert re.match(rf"^perplexity dense {number}; 50% pruned {number}, compensated {number}; 80% pruned {number}, compensated {number}$",
                    printed[-1]), printed[-1]
    assert sorted(p.name for p in examples.iterdir()) == ["gpt2.json"]
    assert json.loads(out.read_text()) == json.loads(json.dumps(summary))
    assert summary["train_steps"] == 30
    assert set(summary["scored"]) == set(BLOCK_WEIGHTS)
    assert summary["dense"] < summary["uniform"]
    for r in summary["results"]:
        assert set(r["layers"]) == set(BLOCK_WEIGHTS)
        if r["undone"]:  # the validation loss guard put the pruned weights back: nothing else skipped
            assert [x.split(":")[0] for x in r["skipped"]] == ["every layer"] and r["compensated"] == pytest.approx(r["pruned"])
        else:
            assert r["skipped"] == []
        assert r["scored_sparsity"] == pytest.approx(r["sparsity"], abs=1e-4)
        assert math.isfinite(r["pruned"]) and math.isfinite(r["compensated"])
        assert r["calibration_forwards"] > 0


def test_gpt2_trainer_callback_example_runs(examples, capsys):
    example = importlib.import_module("gpt2_trainer_callback")
    summary = example.main(["--steps", "12", "--width", "32"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.match(r"^search steps 12 \(= optimizer steps 12\); pruned 0\.50 of the scored weights, 8 layers re-fitted; "
                    r"held-out perplexity dense \d+\.\d\d, pruned and compensated \d+\.\d\d$", last), last
    assert list(examples.iterdir()) == []
    assert set(summary["layers"]) == set(BLOCK_WEIGHTS) and summary["skipped"] == []
    assert summary["dense"] is not None and math.isfinite(summary["compensated"])
