"""Run under `torchrun --nproc_per_node=2`: FSDP2 (`fully_shard`) training with savepoint's usual API.

Saves step 2 (model, AdamW, scheduler, a StatefulDataLoader per rank, RNG per rank), an HF export,
and step 2 again with `sharded_model=True` (weights as DCP shards); trains on to step 4, then
restores step 2 into a freshly built sharded model and trains to step 4 again, and restores the
sharded-weights checkpoint into a third model. Rank 0 writes `ref.safetensors` (full weights and AdamW moments at step 2, gathered by torch)
and `result.json` (losses of both runs, per rank) into OUT for the test to check.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from tests.distributed.common import assert_same, flat_reference, token_data, write_json
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torchdata.stateful_dataloader import StatefulDataLoader

import savepoint
from savepoint.demo import tiny


def build(seed: int):
    model = tiny.tiny_llama(seed=seed).train()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    sampler = torch.utils.data.DistributedSampler(token_data(), shuffle=True, seed=0)
    loader = StatefulDataLoader(token_data(), batch_size=2, sampler=sampler)
    return model, opt, sched, loader


def train(model, opt, sched, batches, n: int) -> list[float]:
    losses = []
    for _ in range(n):
        (ids,) = next(batches)
        ids = torch.where(torch.rand(ids.shape) < 0.1, torch.randint(3, 512, ids.shape), ids)  # per-rank RNG
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def gathered(model, opt) -> dict[str, torch.Tensor]:
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    moments = get_optimizer_state_dict(model, opt, options=options)  # both collective; rank 0 gets them
    return flat_reference(weights, moments) if dist.get_rank() == 0 else {}


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(100 + rank)
    mgr = savepoint.CheckpointManager(f"{out}/run", keep_last=2, dist_timeout=120)

    model, opt, sched, loader = build(seed=0)
    batches = iter(loader)
    train(model, opt, sched, batches, 2)
    mgr.save(2, model=model, optimizer=opt, scheduler=sched, stateful={"data": loader}, metrics={"loss": 1.0})
    ref = gathered(model, opt)
    if rank == 0:
        save_file(ref, f"{out}/ref.safetensors")
    savepoint.save_pretrained(model, f"{out}/export")
    sharded_mgr = savepoint.CheckpointManager(f"{out}/sharded", sharded_model=True, dist_timeout=120)
    sharded_mgr.save(2, model=model, optimizer=opt, scheduler=sched)  # weights stay sharded: DCP, no gather
    first = train(model, opt, sched, batches, 2)

    model, opt, sched, loader = build(seed=1)  # other weights: the restore must replace them all
    torch.manual_seed(999)
    result = mgr.restore(model=model, optimizer=opt, scheduler=sched, stateful={"data": loader})
    assert result.step == 2, result
    restored = gathered(model, opt)
    if rank == 0:
        assert_same(ref, restored, where="restored at 2 ranks")
    again = train(model, opt, sched, iter(loader), 2)

    model, opt, sched, _ = build(seed=2)
    assert sharded_mgr.restore(model=model, optimizer=opt, scheduler=sched).step == 2
    restored = gathered(model, opt)
    if rank == 0:
        assert_same(ref, restored, where="restored from sharded weights at 2 ranks")
    losses: list = [None, None]
    dist.all_gather_object(losses, {"first": first, "again": again})
    if rank == 0:
        write_json(f"{out}/result.json", losses)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
