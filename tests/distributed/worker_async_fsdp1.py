"""Run under `torchrun --nproc_per_node=2`: `async_save=True` with an FSDP1 (`FullyShardedDataParallel`)
model, in three layouts: weights gathered to rank 0 (`sharded_model=False`), weights as each rank's DCP
shards (`sharded_model=True`: ShardedTensors), and the same with a `device_mesh=` given to FSDP1 (torch
then hands out DTensors). AdamW's moments are each rank's DCP shards in every case.

For each case: a synchronous save of the state first (another root), then the async save: save()
returns while the write is held back (the write waits for a signal the training thread sends only after
save() returned, and fails if it never comes), with no "this save is synchronous" warning; training
changes the weights, AdamW moments and scheduler before the write starts and while it runs; after
wait() the async checkpoint's files are byte-identical to the synchronous one's, the checkpoint restores
the save-time state bit-exactly into a fresh FSDP1 model (checked against torch's own full gather at
save time), and training on from it gives the same losses as the uninterrupted run. Then uneven shards
(5 rows over 2 ranks, 1 row: rank 1 holds none) are copied with torch's own layout and saved as a
synchronous save does, and a few saves in a row reuse the same host buffers for the ShardedTensors'
shards. Rank 0 writes OUT/result.json.
"""

from __future__ import annotations

import sys
import threading
import warnings

import torch
import torch.distributed as dist
from tests.distributed.common import assert_same, flat_reference, gather_results
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel

import savepoint
from savepoint.demo import tiny
from savepoint.formats import sharded
from savepoint.manifest import read_manifest
from savepoint.pipeline import save as pipeline_save
from savepoint.snapshot import HostBufferPool, pool_for
from savepoint.snapshot_dcp import host_copy

REUSE_SAVES = 4


def build(seed: int, *, mesh: bool):
    extra = {"device_mesh": init_device_mesh("cpu", (dist.get_world_size(),))} if mesh else {}
    model = FullyShardedDataParallel(
        tiny.tiny_llama(seed=seed).train(), use_orig_params=True, device_id=torch.device("cpu"), **extra
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def batch(step: int) -> torch.Tensor:
    """The same batch for a given step and rank in every run (uninterrupted or resumed)."""
    g = torch.Generator().manual_seed(1000 * step + dist.get_rank())
    return torch.randint(3, 512, (2, 12), generator=g)


def train(model, opt, sched, steps: range) -> list[float]:
    losses = []
    for step in steps:
        ids = batch(step)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def gathered(model, opt, sched) -> dict[str, torch.Tensor]:
    # No cpu_offload: the model is on the CPU already (FSDP1's offload of CPU tensors crashes in torch 2.13).
    options = StateDictOptions(full_state_dict=True)
    weights = get_model_state_dict(model, options=options)
    moments = get_optimizer_state_dict(model, opt, options=options)  # collective; rank 0 gets them
    flat = flat_reference(weights, moments) if dist.get_rank() == 0 else {}
    flat["sched/last_epoch"] = torch.tensor(sched.state_dict()["last_epoch"])
    return flat


class Hooks:
    """Wraps every rank's write phase: holds it until released (when `hold`), records the kinds of the
    DCP tensors it writes and the host pointers of the ShardedTensors' local shards."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.hold = False
        self.kinds: set[str] = set()
        self.pointers: list[frozenset[int]] = []
        real = pipeline_save.write_files

        def write_files(job, staged):
            if self.hold and not self.release.wait(timeout=60):
                raise AssertionError("the write was never released: save() did not return before it")
            self.kinds = {type(t).__name__ for t in job.dcp_tensors.values()}
            self.pointers.append(
                frozenset(
                    shard.tensor.data_ptr()
                    for t in job.dcp_tensors.values()
                    if isinstance(t, ShardedTensor)
                    for shard in t.local_shards()
                )
            )
            return real(job, staged)

        pipeline_save.write_files = write_files


def file_checksums(ckpt: str) -> dict[str, str]:
    # DCP's .metadata names the directory it was written to; every other file holds only the state.
    return {p: e.checksum for p, e in read_manifest(ckpt).files.items() if not p.endswith("/.metadata")}


def check_case(out: str, hooks: Hooks, name: str, *, sharded_model: bool, mesh: bool) -> dict:
    model, opt, sched = build(0, mesh=mesh)
    train(model, opt, sched, range(1, 3))
    ref = gathered(model, opt, sched)

    sync_mgr = savepoint.CheckpointManager(f"{out}/{name}-sync", sharded_model=sharded_model, dist_timeout=60)
    sync_ckpt = sync_mgr.save(2, model=model, optimizer=opt, scheduler=sched)
    sync_mgr.close()

    mgr = savepoint.CheckpointManager(
        f"{out}/{name}", async_save=True, sharded_model=sharded_model, dist_timeout=60
    )
    hooks.hold, hooks.release = True, threading.Event()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = mgr.save(2, model=model, optimizer=opt, scheduler=sched)
    synchronous = [str(w.message) for w in caught if "synchronous" in str(w.message)]
    assert not synchronous, synchronous
    first = train(model, opt, sched, range(3, 4))  # changes weights, moments and schedule before the write
    hooks.release.set()
    first += train(model, opt, sched, range(4, 6))  # ... and while it runs
    mgr.wait()
    hooks.hold = False
    kinds = sorted(hooks.kinds)
    changed = gathered(model, opt, sched)
    if dist.get_rank() == 0:
        assert any(not torch.equal(changed[k], ref[k]) for k in ref if k.startswith("model/")), name
        assert any(not torch.equal(changed[k], ref[k]) for k in ref if k.startswith("optim/")), name
        assert file_checksums(ckpt) == file_checksums(sync_ckpt), name
    mgr.close()

    fresh, fresh_opt, fresh_sched = build(1, mesh=mesh)
    restored_mgr = savepoint.CheckpointManager(f"{out}/{name}", dist_timeout=60)
    assert restored_mgr.restore(model=fresh, optimizer=fresh_opt, scheduler=fresh_sched).step == 2
    assert_same(ref, gathered(fresh, fresh_opt, fresh_sched), where=f"rank {dist.get_rank()}, {name}")
    again = train(fresh, fresh_opt, fresh_sched, range(3, 6))
    assert again == first, (name, first, again)
    return {"kinds": kinds, "losses": first, "resumed": again, "compared": len(ref)}


def layout(tensor: ShardedTensor) -> list[tuple[list[int], list[int], int]]:
    return [(m.shard_offsets, m.shard_sizes, m.placement.rank()) for m in tensor.metadata().shards_metadata]


def check_uneven(out: str) -> dict:
    """Odd row counts: each rank's copy has the live tensor's global size, every rank's offsets and
    sizes, and its values; an async save of them is byte-identical to a synchronous one."""
    torch.manual_seed(0)
    inner = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 1))
    model = FullyShardedDataParallel(inner, use_orig_params=True, device_id=torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    live = {
        **sharded.model_tensors(model),
        **sharded.split_optimizer_state(sharded.optimizer_state(model, opt))[0],
    }
    pool = HostBufferPool()
    pool.begin()
    copies = {name: host_copy(pool, name, t) for name, t in live.items()}
    pool.end()
    empty = 0
    for name, t in live.items():
        if not isinstance(t, ShardedTensor):
            assert torch.equal(copies[name], t), name
            continue
        copy = copies[name]
        assert isinstance(copy, ShardedTensor) and copy.size() == t.size(), name
        assert layout(copy) == layout(t), (name, layout(copy), layout(t))
        assert len(copy.local_shards()) == len(t.local_shards()), name
        empty += not t.local_shards()
        for a, b in zip(copy.local_shards(), t.local_shards(), strict=True):
            assert torch.equal(a.tensor, b.tensor) and a.tensor.data_ptr() != b.tensor.data_ptr(), name
    ckpts = []
    for mode, options in (("sync", {}), ("async", {"async_save": True})):
        mgr = savepoint.CheckpointManager(
            f"{out}/uneven-{mode}", sharded_model=True, dist_timeout=60, **options
        )
        ckpts.append(mgr.save(1, model=model, optimizer=opt))
        mgr.close()
    if dist.get_rank() == 0:
        assert file_checksums(ckpts[0]) == file_checksums(ckpts[1])
    return {
        "sharded_tensors": sum(isinstance(t, ShardedTensor) for t in live.values()),
        "without_local": empty,
    }


def check_reuse(out: str, hooks: Hooks) -> dict:
    model, opt, sched = build(0, mesh=False)
    train(model, opt, sched, range(1, 2))
    root = f"{out}/many"
    mgr = savepoint.CheckpointManager(root, async_save=True, sharded_model=True, keep_last=2, dist_timeout=60)
    hooks.pointers.clear()
    sizes = []
    for step in range(1, REUSE_SAVES + 1):
        mgr.save(step, model=model, optimizer=opt, scheduler=sched)
        train(model, opt, sched, range(step + 1, step + 2))
        sizes.append(pool_for(root).nbytes)
    mgr.close()
    assert all(hooks.pointers), "no ShardedTensor shards were written"
    assert len(set(hooks.pointers)) == 1, f"{len(set(hooks.pointers))} different sets of host buffers"
    assert len(set(sizes)) == 1, sizes
    return {"saves": len(hooks.pointers), "pool_bytes": sizes[-1]}


def main(out: str) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(100 + dist.get_rank())
    hooks = Hooks()
    result = {
        "gathered": check_case(out, hooks, "gathered", sharded_model=False, mesh=False),
        "sharded": check_case(out, hooks, "sharded", sharded_model=True, mesh=False),
        "sharded-mesh": check_case(out, hooks, "sharded-mesh", sharded_model=True, mesh=True),
        "uneven": check_uneven(out),
        "reuse": check_reuse(out, hooks),
    }
    gather_results(out, result)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
