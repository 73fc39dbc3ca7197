"""bingo compare: shared setup, overlap, overhead, resume."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import pytest
import torch

import bingo

from bingo.bench.compare import CompareConfig, mask_overlap, run_compare
from bingo.bench.data import load_dataset
from bingo.estimators.fake_pass import auto_every
from bingo.errors import CheckpointError, ConfigError
from bingo.bench.strategies import STRATEGIES, ImpConfig


def _config(**overrides):
    settings = dict(data="digits", model="mlp", epochs=1, methods=("bingo", "magnitude"), sparsities=(0.5, 0.9), seeds=1, batch_size=64)
    settings.update(overrides)
    return CompareConfig(**settings)


def test_mask_overlap_hand_case():
    a = {"w": torch.tensor([False, False, True, True])}  # prunes 0, 1
    b = {"w": torch.tensor([False, True, False, True])}  # prunes 0, 2
    assert mask_overlap(a, b) == 0.5
    assert mask_overlap(a, a) == 1.0


def test_compare_records_runs_dense_and_overhead(tmp_path):
    methods = ("bingo-paper", "bingo", "magnitude")
    results = run_compare(_config(seeds=2, methods=methods), tmp_path, progress=False)
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert [(r["method"], r["seed"], r["sparsity"]) for r in results["runs"]] == [
        (m, seed, s) for m in methods for seed in (0, 1) for s in (0.5, 0.9)
    ]
    assert [d["seed"] for d in results["dense"]] == [0, 1]
    for row in results["runs"]:
        assert 0 <= row["accuracy"] <= 1 and row["seconds"] > 0 and row["train_steps"] == results["dense"][0]["train_steps"]
    def fake(method):
        return {r["forward_passes"] - r["train_steps"] for r in results["runs"] if r["method"] == method}

    steps = results["dense"][0]["train_steps"]
    every = auto_every(3)  # the default's probe interval for the mlp's 3 layers
    samples = len(load_dataset("digits").x_train[:1024])
    held_out = int(samples * 0.1)  # compensate's validation share, in batches of its own
    one_pass = 2 * (math.ceil((samples - held_out) / 256) + math.ceil(held_out / 256))
    # faithful BINGO: one unmodified + one fake pass per layer (3) at every step; the default (hybrid)
    # does that on every `every`-th step only, and its compensation runs the pruned and the dense network
    # once over the calibration set, layer after layer (graph mode); magnitude has none. The first step
    # with fake passes runs the 3 fake passes once more in full (the check of reusing earlier layers'
    # outputs); the later ones count as whole forwards though they recompute only from the probed layer on.
    check = 3
    assert fake("bingo-paper") == {4 * steps + check}
    # bingo prunes and compensates at each of the 5 blend weights and judges each on the validation split (one batch)
    validation = math.ceil(len(load_dataset("digits").x_val) / 2048)
    assert fake("bingo") == {4 * math.ceil(steps / every) + check + len(bingo.BLEND_WEIGHTS) * (one_pass + validation)}
    chosen = {r["magnitude_weight"] for r in results["runs"] if r["method"] == "bingo"}
    assert chosen and chosen <= set(bingo.BLEND_WEIGHTS)
    assert all("magnitude_weight" not in r for r in results["runs"] if r["method"] != "bingo")
    assert fake("magnitude") == {0}
    assert sorted((o["method"], o["seed"]) for o in results["search_overhead"]) == [
        ("bingo", 0), ("bingo", 1), ("bingo-paper", 0), ("bingo-paper", 1)
    ]
    for overhead in results["search_overhead"]:
        assert overhead["identical_to_plain_training"] is True
        assert overhead["ratio"] == overhead["train_seconds_with_search"] / overhead["train_seconds"]
        extra = overhead["forward_passes_with_search"] - overhead["forward_passes"]
        assert extra == (4 * steps if overhead["method"] == "bingo-paper" else 4 * math.ceil(steps / every)) + check
    masks = sorted(p.name for p in (tmp_path / "masks").iterdir())
    assert "bingo-seed0-sparsity0.9.safetensors" in masks and len(masks) == 12


def test_resume_skips_finished_runs(tmp_path, monkeypatch):
    first = run_compare(_config(methods=("magnitude",)), tmp_path, progress=False)
    calls = []
    original = STRATEGIES["magnitude"].run

    def spy(self, experiment, sparsities):
        calls.append(list(sparsities))
        return original(self, experiment, sparsities)

    monkeypatch.setattr(STRATEGIES["magnitude"], "run", spy)
    second = run_compare(_config(methods=("magnitude", "random"), sparsities=(0.5, 0.8, 0.9)), tmp_path, resume=True, progress=False)
    assert calls == [[0.8]]  # only the sparsity not yet recorded
    kept = [r for r in second["runs"] if r["method"] == "magnitude" and r["sparsity"] in (0.5, 0.9)]
    assert kept == [r for r in first["runs"]]  # earlier rows untouched
    assert {r["method"] for r in second["runs"]} == {"magnitude", "random"}
    assert second["settings"]["sparsities"] == [0.5, 0.8, 0.9]
    assert len(second["dense"]) == 1


def test_resume_refuses_other_settings(tmp_path):
    run_compare(_config(methods=("random",)), tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="was made with epochs=1, not 2"):
        run_compare(_config(methods=("random",), epochs=2), tmp_path, resume=True, progress=False)
    with pytest.raises(CheckpointError, match="was made with batch_size=64, not 32"):
        run_compare(_config(methods=("random",), batch_size=32), tmp_path, resume=True, progress=False)
    with pytest.raises(CheckpointError, match="was made with train_samples=None, not 500"):
        run_compare(_config(methods=("random",), train_samples=500), tmp_path, resume=True, progress=False)


def test_train_samples_trains_every_method_on_one_subset(tmp_path):
    results = run_compare(_config(methods=("magnitude", "random"), sparsities=(0.5,), train_samples=320), tmp_path, progress=False)
    assert results["settings"]["train_samples"] == 320
    # digits' batch 64: 320 examples are 5 steps per epoch, for both methods
    assert {r["train_steps"] for r in results["runs"]} == {5} and results["dense"][0]["train_steps"] == 5
    with pytest.raises(ConfigError, match=r"^training samples must be a whole number >= 1, got 0$"):
        _config(train_samples=0)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"methods": ("bingo", "lasso")}, "unknown method 'lasso'; valid choices: bingo"),
        ({"methods": ()}, "no methods given"),
        ({"sparsities": (0.5, 1.0)}, r"sparsity must be in \[0, 1\)"),
        ({"seeds": 0}, r"seeds must be a whole number in \[1, 10000\]"),
        ({"model": "vgg"}, "unknown model 'vgg'; valid choices: lenet300, mlp, conv"),
        ({"methods": ("random", "random")}, "a method is listed twice"),
    ],
)
def test_bad_compare_settings(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _config(**overrides)


def test_cli_compare_end_to_end_all_methods(tmp_path, capsys):
    from bingo.bench.cli import main

    out = tmp_path / "cmp"
    code = main(
        ["compare", "--data", "digits", "--model", "mlp", "--epochs", "1", "--batch-size", "64",
         "--methods", "bingo,imp,gmp,magnitude,snip,random", "--sparsities", "0.5,0.8", "--seeds", "1",
         "--imp-rate", "0.5", "--gmp-frequency", "5", "--out", str(out), "--no-progress"]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in results["runs"]} == {"bingo", "imp", "gmp", "magnitude", "snip", "random"}
    assert len(results["runs"]) == 12
    assert [m["torch"] for m in results["machines"]] == [torch.__version__]
    assert results["settings"]["method_configs"]["imp"]["rate"] == 0.5
    imp = [r for r in results["runs"] if r["method"] == "imp"]
    assert imp[0]["train_steps"] < imp[1]["train_steps"]  # one trajectory: 0.8 costs more rounds than 0.5
    assert [o["sparsity"] for o in results["overlap"]] == [0.5, 0.8]
    for name in ("results.csv", "accuracy.png", "cost.png", "summary.md"):
        assert (out / name).stat().st_size > 0
    assert "bingo" in capsys.readouterr().out


def test_cli_compare_resume_and_bad_method(tmp_path, capsys):
    from bingo.bench.cli import main

    out = tmp_path / "cmp"
    base = ["compare", "--data", "digits", "--model", "mlp", "--epochs", "1", "--sparsities", "0.5", "--out", str(out), "--no-progress"]
    assert main([*base, "--methods", "random"]) == 0
    before = json.loads((out / "results.json").read_text())
    assert main([*base, "--methods", "random,magnitude", "--resume"]) == 0
    after = json.loads((out / "results.json").read_text())
    assert after["runs"][:1] == before["runs"]  # resumed, not re-run: the random run is kept verbatim
    assert [r["method"] for r in after["runs"]] == ["random", "magnitude"]
    capsys.readouterr()
    assert main([*base, "--methods", "random,lasso"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bingo: error: unknown method 'lasso'; valid choices: bingo, bingo-paper, magnitude, random")
    assert "\n" not in err
    assert json.loads((out / "results.json").read_text()) == after  # untouched by the failed run


def test_cli_compare_finetune_budget_is_charged_to_every_method_that_takes_it(tmp_path):
    from bingo.bench.cli import main

    base = ["compare", "--data", "digits", "--model", "mlp", "--epochs", "1", "--batch-size", "64",
            "--methods", "bingo,magnitude,gmp,snip", "--sparsities", "0.8", "--gmp-frequency", "5", "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "plain")]) == 0
    assert main([*base, "--finetune-epochs", "2", "--out", str(tmp_path / "tuned")]) == 0
    plain = json.loads((tmp_path / "plain" / "results.json").read_text())
    tuned = json.loads((tmp_path / "tuned" / "results.json").read_text())
    epoch = plain["dense"][0]["train_steps"]
    steps = {name: {r["method"]: r["train_steps"] for r in res["runs"]} for name, res in (("plain", plain), ("tuned", tuned))}
    assert steps["plain"] == {"bingo": epoch, "magnitude": epoch, "gmp": epoch, "snip": epoch}
    assert steps["tuned"] == {"bingo": 3 * epoch, "magnitude": 3 * epoch, "gmp": 3 * epoch, "snip": epoch}
    for method in ("bingo", "magnitude", "gmp"):
        assert tuned["settings"]["method_configs"][method]["finetune_epochs"] == 2
        row = {r["method"]: r for r in tuned["runs"]}[method]
        # Counted work, not wall time (which swings on a shared machine): the fine-tune's forwards are charged.
        assert row["forward_passes"] > {r["method"]: r for r in plain["runs"]}[method]["forward_passes"]


def test_cli_compare_on_an_npz_dataset(tmp_path):
    import numpy as np

    from bingo.bench.cli import main

    generator = np.random.default_rng(0)
    centres = generator.normal(size=(3, 1, 6, 6)) * 3
    def images(n):
        labels = generator.integers(0, 3, n)
        return (centres[labels] + generator.normal(size=(n, 1, 6, 6))).astype(np.float32), labels

    x_train, y_train = images(300)
    x_test, y_test = images(90)
    path = tmp_path / "blobs.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    out = tmp_path / "cmp"
    code = main(["compare", "--data", str(path), "--model", "conv", "--epochs", "2", "--batch-size", "32",
                 "--methods", "bingo,imp,gmp,magnitude,snip,random", "--sparsities", "0.5", "--imp-rate", "0.5",
                 "--gmp-frequency", "5", "--out", str(out), "--no-progress"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["data"] == str(path)
    assert {r["method"] for r in results["runs"]} == {"bingo", "imp", "gmp", "magnitude", "snip", "random"}
    assert results["dense"][0]["accuracy"] > 0.9  # well-separated blobs: the CNN really learned them
    assert all(r["sparsity"] == 0.5 and 0 <= r["accuracy"] <= 1 for r in results["runs"])


# ---------------------------------------------------------------- nothing lost, nothing stale


def _no_training(monkeypatch):
    """Make any training fail the test: a refusal must come before the first step."""
    from bingo.bench.strategies import Experiment

    def refuse(*args, **kwargs):
        raise AssertionError("trained before refusing")

    monkeypatch.setattr(Experiment, "train", refuse)


def test_compare_refuses_a_folder_holding_results_without_resume_or_overwrite(tmp_path, monkeypatch):
    run_compare(_config(methods=("random",), sparsities=(0.5,)), tmp_path, progress=False)
    before = (tmp_path / "results.json").read_bytes()
    masks = sorted(p.name for p in (tmp_path / "masks").iterdir())
    _no_training(monkeypatch)
    message = rf"{tmp_path} holds the results of an earlier comparison.*--resume.*--overwrite"
    with pytest.raises(ConfigError, match=message):
        run_compare(_config(methods=("magnitude",), sparsities=(0.5,)), tmp_path, progress=False)
    assert (tmp_path / "results.json").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == masks
    (tmp_path / "results.json").unlink()  # masks/ alone is another run's results too
    with pytest.raises(ConfigError, match=message):
        run_compare(_config(methods=("magnitude",), sparsities=(0.5,)), tmp_path, progress=False)
    with pytest.raises(ConfigError, match="--resume and --overwrite"):
        run_compare(_config(methods=("magnitude",), sparsities=(0.5,)), tmp_path, resume=True, overwrite=True, progress=False)


def test_cli_compare_overwrite_moves_the_earlier_results_aside(tmp_path, capsys):
    from bingo.bench.cli import main

    out = tmp_path / "cmp"
    base = ["compare", "--data", "digits", "--model", "mlp", "--epochs", "1", "--sparsities", "0.5", "--out", str(out), "--no-progress"]
    assert main([*base, "--methods", "random"]) == 0
    earlier = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main([*base, "--methods", "magnitude"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bingo: error: {out} holds the results of an earlier comparison") and err.count("\n") == 1
    assert "--resume" in err and "--overwrite" in err
    assert main([*base, "--methods", "magnitude", "--resume", "--overwrite"]) == 2
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == earlier

    assert main([*base, "--methods", "magnitude", "--overwrite"]) == 0
    (aside,) = out.glob("previous-*")
    assert "moved the earlier results to" in capsys.readouterr().out
    assert {p.relative_to(aside): p.read_bytes() for p in aside.rglob("*") if p.is_file()} == earlier  # nothing deleted
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["runs"]] == ["magnitude"]  # a fresh start, not a resume
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["magnitude-seed0-sparsity0.5.safetensors"]


#: IMP in one round to 0.5: the cheapest run that has an IMP mask
_IMP_ONE_ROUND = {"imp": ImpConfig(rate=0.5)}


def _overlap_keys(results):
    return {key for row in results["overlap"] for key in row if key.endswith("_vs_imp")}


def test_overlap_ignores_mask_files_no_recorded_run_wrote(tmp_path):
    import shutil

    earlier, later = tmp_path / "earlier", tmp_path / "later"
    run_compare(_config(methods=("bingo", "imp"), sparsities=(0.5,), method_configs=_IMP_ONE_ROUND), earlier, progress=False)
    run_compare(_config(methods=("magnitude",), sparsities=(0.5,)), later, progress=False)
    for path in (earlier / "masks").glob("*"):
        shutil.copy(path, later / "masks" / path.name)  # an earlier comparison's files, lying in masks/
    resumed = run_compare(_config(methods=("magnitude", "bingo"), sparsities=(0.5,)), later, resume=True, progress=False)
    assert "imp" not in {r["method"] for r in resumed["runs"]}
    assert resumed["overlap"] == []


def test_overlap_after_overwrite_is_between_the_methods_run_now(tmp_path):
    """The issue's case: a folder of a bingo+imp comparison, then imp and magnitude afresh: no bingo_vs_imp."""
    run_compare(_config(methods=("bingo", "imp"), sparsities=(0.5,), method_configs=_IMP_ONE_ROUND), tmp_path, progress=False)
    fresh = run_compare(_config(methods=("imp", "magnitude"), sparsities=(0.5,), method_configs=_IMP_ONE_ROUND), tmp_path,
                        overwrite=True, progress=False)
    assert _overlap_keys(fresh) == {"magnitude_vs_imp"}
    # resumed, the earlier bingo runs are part of the results again, and so is their overlap with IMP
    run_compare(_config(methods=("bingo", "imp"), sparsities=(0.5,), method_configs=_IMP_ONE_ROUND), tmp_path / "both", progress=False)
    resumed = run_compare(_config(methods=("imp", "magnitude"), sparsities=(0.5,), method_configs=_IMP_ONE_ROUND), tmp_path / "both",
                          resume=True, progress=False)
    assert _overlap_keys(resumed) == {"bingo_vs_imp", "magnitude_vs_imp"}


def test_a_recorded_run_whose_mask_file_was_replaced_or_deleted_runs_again(tmp_path, capsys):
    import shutil

    first, other = tmp_path / "first", tmp_path / "other"
    imp = _config(methods=("imp",), sparsities=(0.5,), method_configs=_IMP_ONE_ROUND)
    original = run_compare(imp, first, progress=False)
    run_compare(dataclasses.replace(imp, seeds=2), other, progress=False)
    mask = first / "masks" / "imp-seed0-sparsity0.5.safetensors"
    shutil.copy(other / "masks" / "imp-seed1-sparsity0.5.safetensors", mask)
    both = dataclasses.replace(imp, methods=("imp", "magnitude"))
    resumed = run_compare(both, first, resume=True, progress=False)
    assert f"the mask file {mask} does not match its recorded digest; imp (seed 0, sparsity 0.5) runs again" in capsys.readouterr().err
    # run again, deterministically: the same row, its file back, and the overlap with IMP computed from it
    (row,) = [r for r in resumed["runs"] if r["method"] == "imp"]
    assert row["mask_sha256"] == original["runs"][0]["mask_sha256"] == hashlib.sha256(mask.read_bytes()).hexdigest()
    assert [r["seed"] for r in resumed["overlap"]] == [0]
    mask.unlink()
    again = run_compare(both, first, resume=True, progress=False)
    assert "is missing; imp (seed 0, sparsity 0.5) runs again" in capsys.readouterr().err and mask.is_file()
    assert [r["mask_sha256"] for r in again["runs"] if r["method"] == "imp"] == [row["mask_sha256"]]
    checked = run_compare(dataclasses.replace(both, seeds=2), other, resume=True, progress=False)
    assert [(r["seed"], sorted(r)) for r in checked["overlap"]] == [
        (seed, ["magnitude_vs_imp", "random_expectation", "seed", "sparsity"]) for seed in (0, 1)
    ]


def test_resumed_imp_delivers_the_network_of_an_uninterrupted_run(tmp_path):
    """Killed after IMP delivered 0.5 and before 0.9: the resumed 0.9 row is the uninterrupted one."""
    # rate 0.4: 2 rounds to 0.5 and 4 more to 0.9 in one trajectory, 5 rounds straight to 0.9
    config = _config(methods=("imp",), sparsities=(0.5, 0.9), method_configs={"imp": ImpConfig(rate=0.4)})
    whole = run_compare(config, tmp_path, progress=False)
    # what a kill before 0.9 leaves: the 0.5 row and mask, no 0.9 row (its mask never written)
    killed = dict(whole, runs=[r for r in whole["runs"] if r["sparsity"] == 0.5])
    (tmp_path / "results.json").write_text(json.dumps(killed))
    (tmp_path / "masks" / "imp-seed0-sparsity0.9.safetensors").unlink()
    resumed = run_compare(config, tmp_path, resume=True, progress=False)
    fields = ("accuracy", "train_steps", "forward_passes", "layer_sparsity")
    (before,), (after,) = ([{k: r[k] for k in fields} for r in res["runs"] if r["sparsity"] == 0.9] for res in (whole, resumed))
    assert after == before
    assert [r for r in resumed["runs"] if r["sparsity"] == 0.5] == [r for r in whole["runs"] if r["sparsity"] == 0.5]


@pytest.mark.parametrize(
    "content,why",
    [
        (b"[1, 2, 3]", r"top level is a list, not an object"),
        (b"null", r"top level is null, not an object"),
        (b'{"data": "digits", "model": "mlp", "epochs": 1, "settings": {}, "dense": [], "runs": 3}', r"'runs' is a whole number, not a list"),
        (b'{"data": "digits", "model": "mlp", "epochs": 1, "settings": [], "dense": [], "runs": []}', r"'settings' is a list, not an object"),
        (b'{"data": "digits", "model": "mlp", "epochs": 1, "settings": {}, "dense": [], "runs": [{"method": "random"}]}', r"runs\[0\] has no 'seed'"),
        (b'{"data": "digits", "model": "mlp", "epochs": "1", "settings": {}, "dense": [], "runs": []}', r"'epochs' is a string, not a whole number"),
        (b"\x93\xff\x00binary", r"not JSON"),
    ],
)
def test_resume_from_a_file_that_is_not_compare_results(tmp_path, content, why):
    (tmp_path / "results.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"cannot resume from {tmp_path / 'results.json'}: not a bingo compare results file \(.*{why}"):
        run_compare(_config(methods=("random",), sparsities=(0.5,)), tmp_path, resume=True, progress=False)
    assert (tmp_path / "results.json").read_bytes() == content


def test_cli_compare_resume_from_a_list_is_one_line(tmp_path, capsys):
    from bingo.bench.cli import main

    (tmp_path / "results.json").write_text("[1,2,3]")
    code = main(["compare", "--data", "digits", "--model", "mlp", "--epochs", "1", "--methods", "random",
                 "--sparsities", "0.5", "--out", str(tmp_path), "--resume", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"bingo: error: cannot resume from {tmp_path / 'results.json'}: not a bingo compare results file")
    assert (tmp_path / "results.json").read_text() == "[1,2,3]"


def test_resume_accepts_settings_recorded_before_nested_configs(tmp_path):
    """A results.json from before the estimator refactor (flat bingo settings, batched, an unread rule) still resumes."""
    out = tmp_path / "cmp"
    from bingo.bench.strategies import BINGO

    from bingo.bench.strategies import CompensationConfig

    # the default of those days: fake passes every 10th step, the Taylor average from every step, a fixed blend, no compensation
    then = dataclasses.replace(BINGO, search=dataclasses.replace(BINGO.search, every=10, taylor_every=1), magnitude_weight=0.5,
                               compensation=CompensationConfig(compensate=False))
    config = CompareConfig(data="digits", model="mlp", epochs=1, methods=("bingo",), sparsities=(0.5,), seeds=1,
                           method_configs={"bingo": then})
    results = run_compare(config, out, progress=False)
    old = json.loads((out / "results.json").read_text())
    old["settings"]["method_configs"]["bingo"] = {
        "estimator": "hybrid", "mode": "zero", "decay": 0.99, "fraction": 0.01, "metric": "loss", "rule": "contrast",
        "every": 10, "target": 0.0, "band": 0.1, "batched": False, "magnitude_weight": 0.5, "finetune_epochs": 0,
        "scope": "global", "granularity": "weight",
    }
    del old["machines"]
    (out / "results.json").write_text(json.dumps(old))
    resumed = run_compare(config, out, resume=True, progress=False)
    assert resumed["runs"] == results["runs"]
    assert resumed["machines"] == []  # nothing was measured here: no machine is claimed for the old rows
    old["settings"]["method_configs"]["bingo"]["every"] = 5  # a real difference is still refused
    (out / "results.json").write_text(json.dumps(old))
    with pytest.raises(CheckpointError, match=r"ran bingo with other settings"):
        run_compare(config, out, resume=True, progress=False)


def test_resume_accepts_records_from_before_the_batchnorm_setting_and_refuses_a_real_change(tmp_path):
    from bingo.bench.strategies import CompensationConfig, OneShotConfig

    def config(batchnorm: str) -> CompareConfig:
        compensated = OneShotConfig(compensation=CompensationConfig(compensate=True, batchnorm=batchnorm))
        return _config(methods=("magnitude",), sparsities=(0.5,), method_configs={"magnitude": compensated})

    results = run_compare(config("keep"), tmp_path, progress=False)
    recorded = json.loads((tmp_path / "results.json").read_text())
    del recorded["settings"]["method_configs"]["magnitude"]["compensation"]["batchnorm"]  # as recorded before the option
    (tmp_path / "results.json").write_text(json.dumps(recorded))
    assert run_compare(config("keep"), tmp_path, resume=True, progress=False)["runs"] == results["runs"]
    with pytest.raises(CheckpointError, match=r"ran magnitude with other settings"):
        run_compare(config("reestimate"), tmp_path, resume=True, progress=False)


def test_rerun_changed_replaces_only_the_changed_methods_rows(tmp_path, capsys):
    from bingo.bench.cli import main

    base = ["compare", "--data", "digits", "--model", "mlp", "--epochs", "1", "--sparsities", "0.5", "--seeds", "1",
            "--methods", "magnitude,random", "--magnitude-compensate", "--no-progress", "--out", str(tmp_path)]
    assert main(base) == 0
    before = json.loads((tmp_path / "results.json").read_text())
    changed = [*base, "--magnitude-solver", "sparsegpt", "--resume"]
    assert main(changed) == 2  # refused: magnitude ran with another solver
    assert "--rerun-changed" in capsys.readouterr().err
    assert main([*base, "--rerun-changed"]) == 2  # only with --resume
    assert "goes with --resume" in capsys.readouterr().err
    assert main([*changed, "--rerun-changed"]) == 0
    after = json.loads((tmp_path / "results.json").read_text())
    assert "magnitude ran with other settings" in capsys.readouterr().err
    assert after["dense"] == before["dense"]  # the dense run is shared: kept
    assert len(after["runs"]) == len(before["runs"]) == 2
    assert after["settings"]["method_configs"]["magnitude"]["compensation"]["solver"] == "sparsegpt"
    rerun = [r for r in after["runs"] if r["method"] == "magnitude"]
    assert len(rerun) == 1 and rerun != [r for r in before["runs"] if r["method"] == "magnitude"]  # measured again
    random_rows = [r for r in after["runs"] if r["method"] == "random"]
    assert random_rows == [r for r in before["runs"] if r["method"] == "random"]  # unchanged: kept verbatim
    assert main([*changed, "--rerun-changed"]) == 0  # now up to date: nothing runs again
    assert json.loads((tmp_path / "results.json").read_text())["runs"] == after["runs"]
