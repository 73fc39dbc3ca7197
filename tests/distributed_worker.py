"""One process of a 2-process torchrun job, started by tests/test_distributed.py (not a test module itself).

    torchrun --standalone --nproc_per_node 2 tests/distributed_worker.py MODEL ATTACH OUT_DIR [--die-at STEP]

Trains MODEL (mlp, or cnn: BatchNorm and Dropout) in DistributedDataParallel
on its shard of each global batch with a ticket search attached to the DDP
wrapper or the inner module (ATTACH = wrapper | inner; group: the inner
module, with a process group passed explicitly), prunes gradually
with a SparsityScheduler, prunes one-shot, compensates on this rank's own
calibration inputs (different on every rank) and fine-tunes; then writes
what it ended with to OUT_DIR/rank<R>.pt. ``--die-at STEP``: rank 1 exits
abruptly at that step, as a crashed process would (the fault case), and
rank 0 would write OUT_DIR/result.pt atomically only at the very end.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bingo  # noqa: E402
import bingo.distributed  # noqa: E402
from bingo.io import save_checkpoint  # noqa: E402
from conftest import make_cnn, make_mlp, tiny_data  # noqa: E402


def main() -> None:
    model_name, attach, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    die_at = int(sys.argv[5]) if len(sys.argv) > 5 and sys.argv[4] == "--die-at" else None
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    # every rank initialises its own weights: DDP makes them rank 0's, and so must the search's θ0
    model = make_mlp(seed=rank) if model_name == "mlp" else make_cnn(seed=rank)
    x, y = tiny_data((128, 16), 4) if model_name == "mlp" else tiny_data((128, 1, 4, 4), 3)
    # "group": the collectives go through an explicitly passed process group (all ranks, a new group object)
    group = dist.new_group(list(range(world))) if attach == "group" else None
    settings = dict(estimator="hybrid", metric="loss", mode="reset", every=2, fraction=0.2, seed=0, process_group=group)
    if attach == "wrapper":
        ddp = DistributedDataParallel(model, process_group=group)
        search = bingo.TicketSearch(ddp, **settings)
    else:  # the search first, on weights that still differ between ranks
        search = bingo.TicketSearch(model, **settings)
        ddp = DistributedDataParallel(model, process_group=group)
    torch.manual_seed(1 + rank)  # dropout differs per rank, as it would on real shards
    optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-2)
    scheduler = bingo.SparsityScheduler(ddp, search.significance, 0.5, start_step=4, end_step=12, frequency=4)
    order = torch.Generator().manual_seed(0)
    step = 0
    for epoch in range(2):
        for batch in torch.randperm(128, generator=order).split(16):
            mine = batch[rank::world]  # this rank's half of the global batch
            loss = F.cross_entropy(ddp(x[mine]), y[mine])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            search.step(x[mine], y[mine])
            scheduler.step()
            step += 1
            if die_at is not None and rank == 1 and step == die_at:
                os._exit(3)  # a crash: no cleanup, no goodbye to the other rank
    scores = search.significance()
    masks = bingo.prune(ddp, scores, 0.8)
    calibration = x[rank * 32 : rank * 32 + 32]  # each rank its own inputs: the fit must pool them
    result = bingo.compensate(ddp, None, calibration, process_group=group)
    for _ in range(3):
        mine = torch.arange(rank, 128, world)[:32]
        loss = F.cross_entropy(ddp(x[mine]), y[mine])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    bingo.distributed.broadcast_buffers(ddp, group)  # the last forward counted each rank's own batch in BatchNorm
    state = {
        "scores": scores,
        "theta0": search.theta0,
        "masks": masks,
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
        "compensated": list(result.layers),
        "sparsity": bingo.model_sparsity(ddp),
    }
    torch.save(state, out / f"rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        save_checkpoint({"done": True}, out / "result.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
