"""Distributed data parallel runs: every rank ends with the same scores, masks and weights.

bingo uses PyTorch's own engine: ``torch.distributed`` for the collectives
and ``DistributedDataParallel`` for training. Nothing here is needed by a
single-process run; every function is a no-op (or the identity) when
``torch.distributed`` is not initialised.

What agreement rests on (see the README's "Distributed training"):

- weights: DDP keeps them equal (same θ0, averaged gradients);
- fake-pass subsets: drawn from the search's own ``torch.Generator``, seeded
  the same on every rank, so every rank probes the same weights;
- measurements: each rank measures its own batch; the scores of a fake pass
  are averaged over ranks (:func:`average_over_ranks`) before any accumulator
  sees them, so every accumulator is the same on every rank. With equal
  per-rank batches and a mean-reduced metric (loss or accuracy), the
  average is the measurement on the global batch;
- Taylor terms read the gradients DDP has already averaged;
- buffers: DDP broadcasts rank 0's at every forward, but after the last
  forward each rank's BatchNorm statistics have counted its own shard;
  bingo's training loop and :func:`bingo.compensate` first make them rank
  0's again (:func:`broadcast_buffers`);
- compensation sums its least-squares statistics (``XᵀX``, ``XᵀY``) over
  ranks (:func:`sum_over_ranks`): the fit on the union of every rank's
  calibration inputs.

Selection is deterministic given the scores and its seed, so the masks agree.

Every collective takes an optional ``group`` (a ``torch.distributed``
process group; default: the whole job), as ``TicketSearch(...,
process_group=...)`` and ``compensate(..., process_group=...)`` pass it on.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from .errors import ConfigError

__all__ = [
    "active",
    "average_over_ranks",
    "backend_for",
    "barrier",
    "broadcast_buffers",
    "broadcast_tensors",
    "init_from_environment",
    "is_main_process",
    "mean_over_ranks",
    "rank",
    "rank_device",
    "shard",
    "sum_over_ranks",
    "unwrap",
    "world_size",
]


def active(group: object | None = None) -> bool:
    """True when ``torch.distributed`` is initialised and ``group`` (default: all processes) has more than one."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank(group: object | None = None) -> int:
    """This process's rank in ``group`` (0 when not distributed)."""
    return dist.get_rank(group) if active(group) else 0


def world_size(group: object | None = None) -> int:
    """Number of processes in ``group`` (1 when not distributed)."""
    return dist.get_world_size(group) if active(group) else 1


def is_main_process() -> bool:
    """True on rank 0 of the job: the one process that writes results, checkpoints and progress bars."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if active():
        dist.barrier()


def unwrap(model: nn.Module) -> nn.Module:
    """The module a ``DistributedDataParallel`` (or ``DataParallel``) wrapper trains, or ``torch.compile`` compiled; else ``model``.

    Scores and masks are keyed by the inner module's parameter names
    (``"fc1.weight"``, not ``"module.fc1.weight"`` or ``"_orig_mod.fc1.weight"``),
    so a search attached to the wrapper and one attached to the inner module
    agree, and bingo's own extra forwards (fake passes, calibration) run the
    plain module rather than making the compiler trace each variant again.
    """
    if not isinstance(model, nn.Module):
        from .checks import describe  # checks imports nothing of bingo's but errors

        raise ConfigError(f"model must be a torch.nn.Module, got {describe(model)}")
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # torch.compile's wrapper (torch._dynamo's OptimizedModule), not imported to check
        else:
            return model


def _device() -> torch.device:
    # gloo reduces CPU tensors; nccl needs them on the process's GPU.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _reduce(values: torch.Tensor, group: object | None) -> torch.Tensor:
    moved = values.to(_device())
    dist.all_reduce(moved, op=dist.ReduceOp.SUM, group=group)
    return moved.to(values.device)


def mean_over_ranks(values: Sequence[float], group: object | None = None) -> list[float]:
    """The mean over ``group``'s ranks of each value (float64); the values themselves when not distributed."""
    if not active(group):
        return list(values)
    total = _reduce(torch.tensor(list(values), dtype=torch.float64), group)
    return (total / world_size(group)).tolist()


def average_over_ranks(values: torch.Tensor, group: object | None = None) -> torch.Tensor:
    """The mean over ``group``'s ranks of ``values`` (a new tensor, on ``values``' device); ``values`` itself when not distributed.

    No host sync of its own: the reduction runs on the backend's device
    (``values``' own when it is the process's GPU under nccl).
    """
    if not active(group):
        return values
    return _reduce(values, group) / world_size(group)


def sum_over_ranks(tensor: torch.Tensor, group: object | None = None) -> torch.Tensor:
    """``tensor`` summed over ``group``'s ranks, in place (the same bits on every rank); unchanged when not distributed."""
    if active(group):
        tensor.copy_(_reduce(tensor, group))
    return tensor


def broadcast_buffers(model: nn.Module, group: object | None = None) -> None:
    """Make every rank's buffers (BatchNorm running statistics, masks) rank 0's, in place.

    What ``DistributedDataParallel(broadcast_buffers=True)`` does at the start
    of every forward: after the last training forward each rank's BatchNorm
    has also counted its own shard, so the ranks' statistics differ until the
    next forward. bingo calls this where it needs them equal: at the end of
    :func:`bingo.bench.training.train` and at the start of :func:`bingo.compensate`.
    No-op when not distributed. The source is ``group``'s first rank.
    """
    broadcast_tensors(list(unwrap(model).buffers()), group)


def broadcast_tensors(tensors: Sequence[torch.Tensor], group: object | None = None) -> None:
    """Make every rank's ``tensors`` the first rank's of ``group``, in place (no-op when not distributed)."""
    if not active(group):
        return
    source = 0 if group is None else dist.get_global_rank(group, 0)
    with torch.no_grad():
        for tensor in tensors:
            moved = tensor.to(_device())
            dist.broadcast(moved, src=source, group=group)
            tensor.copy_(moved.to(tensor.device))


def shard(index: torch.Tensor) -> torch.Tensor:
    """This rank's share of a global batch: every ``world_size``-th entry from position ``rank``.

    The global batch is the same on every rank (one data order, seeded the
    same), so the shards together are exactly the one-process batch.
    """
    return index[rank() :: world_size()] if active() else index


def backend_for(device: torch.device) -> str:
    """The ``torch.distributed`` backend for a job that trains on ``device``: nccl on CUDA GPUs, gloo on the CPU."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def rank_device(device: torch.device) -> torch.device:
    """This process's device under ``torchrun``: ``cuda`` means ``cuda:LOCAL_RANK`` (one GPU per process).

    A CPU device, or one with an explicit index, is returned as it is;
    outside ``torchrun`` (no ``LOCAL_RANK``) too.
    """
    device = torch.device(device)
    local = os.environ.get("LOCAL_RANK")
    if device.type != "cuda" or device.index is not None or local is None or not local.strip().isdigit():
        return device
    return torch.device("cuda", int(local))


def init_from_environment(backend: str = "gloo") -> bool:
    """Join the process group that ``torchrun`` describes in the environment; True if this run is distributed.

    Reads ``WORLD_SIZE`` (``RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` as
    ``torchrun`` sets them). ``backend``: ``gloo`` (CPU tensors: what ``bingo
    run`` trains on) or ``nccl`` (a process per GPU; the device is set from
    ``LOCAL_RANK``). Does nothing when ``WORLD_SIZE`` is unset or 1, or when
    a process group already exists.
    """
    size = os.environ.get("WORLD_SIZE")
    if size is None or dist.is_initialized():
        return active()
    try:
        processes = int(size)
    except ValueError:
        raise ConfigError(f"WORLD_SIZE must be a whole number of processes, got {size!r}") from None
    if processes <= 1:
        return False
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={size} but {', '.join(missing)} not set: start distributed runs with torchrun")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True
