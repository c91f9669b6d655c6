"""Run under `torchrun --nproc_per_node=2`: an FSDP2 Mixtral (fused experts in memory) saved and restored.

Trains 2 steps and saves (weights gathered into the Hub's layout, again with `async_save=True`, whose
gather, conversion and write run on the background thread, and as DCP shards with
`sharded_model=True`); trains 2 more;
builds a fresh sharded model, restores (each rank converts the Hub's tensors back to the fused ones
and keeps its shard) and trains the same 2 steps again. Rank 0 writes `result.json` with both runs'
losses per rank. Last, a DDP Mixtral saved with `async_save=True` (written, converted and committed
on each rank's background thread while its live weights change); rank 0 also writes transformers'
own `save_pretrained` of the save-time weights to OUT/ddp_reference.
"""

from __future__ import annotations

import json
import sys
import warnings

import torch
import torch.distributed as dist
from tests.helpers.converted_models import BUILDERS
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import savepoint


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = BUILDERS["mixtral"]().train()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range) -> list[float]:
    losses = []
    for step in steps:
        gen = torch.Generator().manual_seed(1000 * dist.get_rank() + step)
        ids = torch.randint(4, 128, (2, 12), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def main(out: str) -> None:
    dist.init_process_group("gloo")
    mgr = savepoint.CheckpointManager(f"{out}/run", dist_timeout=120)
    model, opt = build()
    train(model, opt, range(2))
    mgr.save(2, model=model, optimizer=opt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with savepoint.CheckpointManager(f"{out}/async_fsdp2", async_save=True, dist_timeout=120) as amgr:
            amgr.save(2, model=model, optimizer=opt)
    assert not any("this save is synchronous" in str(w.message) for w in caught), caught
    sharded = savepoint.CheckpointManager(f"{out}/sharded", sharded_model=True, dist_timeout=120)
    sharded.save(2, model=model, optimizer=opt)  # weights stay DCP shards, for `savepoint consolidate`
    sharded.close()
    first = train(model, opt, range(2, 4))

    fresh, fresh_opt = build()
    mgr.restore(model=fresh, optimizer=fresh_opt)
    again = train(fresh, fresh_opt, range(2, 4))
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"first": first, "again": again})
    if dist.get_rank() == 0:
        with open(f"{out}/result.json", "w") as f:
            json.dump(gathered, f)
    mgr.close()
    save_ddp_async(out)
    dist.barrier()
    dist.destroy_process_group()


def save_ddp_async(out: str) -> None:
    inner = BUILDERS["mixtral"]().train()
    model = DistributedDataParallel(inner)
    with savepoint.CheckpointManager(f"{out}/async_ddp", async_save=True, dist_timeout=120) as mgr:
        mgr.save(1, model=model)  # returns after the snapshot: the write runs in the background
        if dist.get_rank() == 0:
            inner.save_pretrained(f"{out}/ddp_reference")
        with torch.no_grad():  # the live weights change while the save is (or may be) in flight
            for p in inner.parameters():
                p.add_(1.0)
        mgr.wait()


if __name__ == "__main__":
    main(sys.argv[1])
