"""Real 2-process torchrun jobs (gloo, CPU): every rank ends with the same scores, masks and weights.

Each test starts ``torchrun --standalone`` (a free rendezvous port of its own)
on tests/distributed_worker.py or on ``python -m bingo run``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bingo.io import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "distributed_worker.py"

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
            "OMP_NUM_THREADS": "1"}


def _torchrun(*argv: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *argv]


@pytest.mark.parametrize("model,attach", [("mlp", "wrapper"), ("mlp", "inner"), ("cnn", "wrapper"), ("cnn", "inner"),
                                          ("cnn", "group")], ids=["mlp-wrapper", "mlp-inner", "cnn-wrapper", "cnn-inner", "cnn-group"])
def test_both_ranks_end_with_the_same_scores_masks_and_weights(model, attach, tmp_path):
    done = subprocess.run(_torchrun(str(WORKER), model, attach, str(tmp_path)), env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for part in ("theta0", "scores", "masks", "weights"):
        assert list(ranks[0][part]) == list(ranks[1][part])
        for key in ranks[0][part]:
            assert torch.equal(ranks[0][part][key], ranks[1][part][key]), f"{part} {key} differ between ranks"
    assert ranks[0]["compensated"] == ranks[1]["compensated"] and ranks[0]["compensated"]
    assert round(ranks[0]["sparsity"], 2) == 0.8
    # the run was not trivially identical: the ranks saw different data (their shards, their calibration)
    assert any(key.endswith("_mask") for key in ranks[0]["weights"])


def test_a_rank_that_dies_fails_the_job_and_nothing_is_half_written(tmp_path):
    done = subprocess.run(_torchrun(str(WORKER), "mlp", "inner", str(tmp_path), "--die-at", "5"), env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "exitcode  : 3" in done.stderr  # torchrun names the rank that died and how
    assert list(tmp_path.iterdir()) == []  # no result, no partial file


def _bingo_run(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return _torchrun("-m", "bingo", "run", "--data", "digits", "--model", "mlp", "--sparsity", "0.5,0.9", "--no-progress",
                     "--out", str(tmp_path / f"{name}.json"), *extra)


def test_bingo_run_under_torchrun_writes_one_set_of_outputs(tmp_path):
    # 129 examples in batches of 16: the last global batch (1 example) cannot give each process two, and is dropped
    done = subprocess.run(_bingo_run(tmp_path, "results", "--epochs", "2", "--train-samples", "129", "--batch-size", "16",
                                     "--scores", str(tmp_path / "scores.safetensors")),
                          env=_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("results in") == 1  # rank 0 alone reports
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "scores.safetensors"]
    report = json.loads((tmp_path / "results.json").read_text())
    assert [row["sparsity"] for row in report["results"]] == [0.5, 0.9]
    assert report["dense_accuracy"] > 0.3
    assert (report["processes"], report["train_examples"], report["train_steps"]) == (2, 129, 2 * 8)


def test_bingo_run_under_torchrun_resumes_after_a_rank_is_killed(tmp_path):
    epochs = ["--epochs", "40"]
    whole = subprocess.run(_bingo_run(tmp_path, "whole", *epochs), env=_env(), capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]
    checkpoint = tmp_path / "run.ckpt"
    job = subprocess.Popen(_bingo_run(tmp_path, "resumed", *epochs, "--checkpoint", str(checkpoint)), env=_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not checkpoint.exists() and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.02)
        assert checkpoint.exists() and job.poll() is None, "the job ended before its first checkpoint could be interrupted"
        workers = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2
        os.kill(int(workers[-1]), signal.SIGKILL)  # one rank dies mid-training
        _, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode != 0
    assert "Signal 9 (SIGKILL)" in err or "exitcode  : -9" in err, err[-2000:]
    assert not (tmp_path / "resumed.json").exists()  # no result from the failed job
    state = load_checkpoint(checkpoint)  # the checkpoint on disk is a complete one (checksummed)
    assert 1 <= state["epoch"] < 40
    resumed = subprocess.run(_bingo_run(tmp_path, "resumed", *epochs, "--checkpoint", str(checkpoint)), env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = [json.loads((tmp_path / f"{name}.json").read_text()) for name in ("whole", "resumed")]
    assert rows[0]["dense_accuracy"] == rows[1]["dense_accuracy"]
    untimed = [[{k: v for k, v in row.items() if k != "prune_seconds"} for row in r["results"]] for r in rows]
    assert untimed[0] == untimed[1]  # every row but its wall time


def test_other_commands_refuse_to_run_under_torchrun(tmp_path):
    env = {**_env(), "WORLD_SIZE": "2", "RANK": "0"}
    done = subprocess.run([sys.executable, "-m", "bingo", "compare", "--data", "digits", "--model", "mlp", "--out", str(tmp_path / "c")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr == "bingo: error: 'bingo compare' runs in one process; under torchrun only 'bingo run' is distributed\n"
    assert list(tmp_path.iterdir()) == []
