"""Devices: the one-line errors, the device recorded, data moved to the model's device."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import bingo
from bingo import ConfigError
from bingo.devices import model_device, resolve_device, to_device

NO_CUDA = not torch.cuda.is_available()


def test_resolve_device_names_and_errors():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match=r"^unknown device 'tpu'; valid choices: auto, cpu, cuda, cuda:N$"):
        resolve_device("tpu")
    with pytest.raises(ConfigError, match=r"^unknown device 'cuda:x'"):
        resolve_device("cuda:x")
    if NO_CUDA:
        with pytest.raises(ConfigError, match=r"^device 'cuda:1' is not available: this machine has no CUDA GPU"):
            resolve_device("cuda:1")
    else:
        with pytest.raises(ConfigError, match=r"is not available: this machine has \d+ CUDA GPU"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_model_device_and_to_device():
    assert model_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert model_device(nn.ReLU()) == torch.device("cpu")  # no parameters, no buffers
    meta = nn.Linear(2, 2).to("meta")
    assert model_device(meta) == torch.device("meta")
    moved = to_device({"a": torch.ones(2), "b": (torch.zeros(1), 3)}, torch.device("meta"))
    assert moved["a"].device.type == "meta" and moved["b"][0].device.type == "meta" and moved["b"][1] == 3


@pytest.mark.parametrize("command", ["run", "compare", "demo"])
def test_cli_refuses_a_device_that_is_not_there_before_training(command, tmp_path, capsys):
    from bingo.bench.cli import main

    args = {"run": ["run", "--data", "digits", "--model", "mlp", "--epochs", "1", "--sparsity", "0.5", "--out", str(tmp_path / "r.json")],
            "compare": ["compare", "--data", "digits", "--model", "mlp", "--epochs", "1", "--methods", "random", "--sparsities", "0.5",
                        "--out", str(tmp_path / "cmp")],
            "demo": ["demo", "--epochs", "1"]}[command]
    wanted = "tpu" if not NO_CUDA else "cuda"
    assert main([*args, "--device", wanted, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bingo: error: ") and "\n" not in err and "device" in err
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "cmp" / "results.json").exists()


def test_run_records_the_device_it_used(tmp_path):
    from bingo.bench.cli import main

    out = tmp_path / "r.json"
    assert main(["run", "--data", "digits", "--model", "mlp", "--epochs", "1", "--sparsity", "0.5", "--device", "cpu",
                 "--out", str(out), "--no-progress"]) == 0
    assert json.loads(out.read_text())["device"] == "cpu"


@pytest.mark.cuda
def test_run_on_cuda_end_to_end(tmp_path):
    from bingo.bench.cli import main

    out = tmp_path / "r.json"
    assert main(["run", "--data", "digits", "--model", "mlp", "--epochs", "1", "--sparsity", "0.5", "--device", "cuda",
                 "--out", str(out), "--no-progress"]) == 0
    assert json.loads(out.read_text())["device"].startswith("cuda")


@pytest.mark.cuda
def test_compensate_moves_cpu_calibration_to_a_cuda_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).cuda()
    bingo.prune(model, bingo.magnitude_scores(model, include=["*"]), 0.5)
    result = bingo.compensate(model, None, torch.randn(200, 8))
    assert result.layers and all(p.device.type == "cuda" for p in model.parameters())


def test_under_torchrun_cuda_means_this_ranks_gpu(monkeypatch):
    from bingo import distributed

    monkeypatch.setenv("LOCAL_RANK", "3")
    assert distributed.rank_device(torch.device("cuda")) == torch.device("cuda", 3)
    assert distributed.rank_device(torch.device("cuda", 1)) == torch.device("cuda", 1)  # an explicit index is kept
    assert distributed.rank_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.delenv("LOCAL_RANK")
    assert distributed.rank_device(torch.device("cuda")) == torch.device("cuda")
    assert distributed.backend_for(torch.device("cuda", 0)) == "nccl"
    assert distributed.backend_for(torch.device("cpu")) == "gloo"
