"""Run under `torchrun --nproc_per_node=2`: `async_save=True` with an FSDP2 (`fully_shard`) model, with
`sharded_model=False` (weights gathered to rank 0, AdamW moments as each rank's DCP shards) and True
(weights and moments as DCP shards).

For each mode: save() returns while the write is held back (the write waits for a signal the training
thread sends only after save() returned, and fails if it never comes), training changes the weights,
AdamW moments and scheduler before the write starts and while it runs, and the checkpoint restores the
save-time state bit-exactly into a fresh FSDP2 model (checked against torch's own full gather), with no
warning. Then a failure injected into rank 1's background write is raised on both ranks by wait() and
by the next save(), and nothing is committed for it (the failure is raised inside DCP's write, so DCP
reports it to every rank). Finally many saves in a row reuse the same host
buffers (same pointers, same pool size). First, the background weight gather (shard_gather.py) is
checked against torch's own `full_tensor()` on uneven shards. Rank 0 writes OUT/result.json.
"""

from __future__ import annotations

import sys
import threading
import warnings

import torch
import torch.distributed as dist
from tests.distributed.common import assert_same, flat_reference, gather_results
from tests.distributed.worker_reshard import build
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import savepoint
from savepoint.distributed import DistributedSaveError
from savepoint.formats.dcp_ranges import RangeRecordingWriter
from savepoint.pipeline import save as pipeline_save
from savepoint.shard_gather import gather_rows
from savepoint.snapshot import pool_for

REPEATS = 24  # saves in a row for the buffer-reuse check


class InjectedWriteError(RuntimeError):
    pass


def train(model, opt, sched, n: int = 1) -> None:
    for _ in range(n):
        ids = torch.randint(3, 512, (2, 12))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def gathered(model, opt, sched) -> dict[str, torch.Tensor]:
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    moments = get_optimizer_state_dict(model, opt, options=options)  # collective; rank 0 gets them
    flat = flat_reference(weights, moments) if dist.get_rank() == 0 else {}
    flat["sched/last_epoch"] = torch.tensor(sched.state_dict()["last_epoch"])
    return flat


class Hooks:
    """Wraps the background write of every rank: holds it until released, records the host pointers
    of the DCP shards it writes, and fails rank 1's DCP write (inside DCP, as a full disk would) for
    the steps in `fail`."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.hold = False
        self.fail: set[int] = set()
        self.step = 0
        self.pointers: list[frozenset[int]] = []
        self.deferred: list[bool] = []  # whether the weight gather was left to the write phase
        real = pipeline_save.write_files

        def write_files(job, staged):
            if self.hold and not self.release.wait(timeout=60):
                raise AssertionError("the write was never released: save() did not return before it")
            self.step = job.request.step
            self.deferred.append(job.model_shards is not None)
            dtensors = [t for t in job.dcp_tensors.values() if isinstance(t, DTensor)]
            assert dtensors, "the job has no DTensor shards"
            self.pointers.append(frozenset(t.to_local().data_ptr() for t in dtensors))
            return real(job, staged)

        pipeline_save.write_files = write_files
        real_write_data = RangeRecordingWriter.write_data

        def write_data(writer, plan, planner):
            if dist.get_rank() == 1 and self.step in self.fail:
                raise InjectedWriteError(f"injected failure writing step {self.step}")
            return real_write_data(writer, plan, planner)

        RangeRecordingWriter.write_data = write_data


def expect_failure(call, step: int) -> None:
    try:
        call()
    except (InjectedWriteError, DistributedSaveError, CheckpointException) as exc:
        assert "injected failure" in str(exc) or "rank 1" in str(exc), exc
        return
    raise AssertionError(f"rank {dist.get_rank()}: the failed background save of step {step} was not raised")


def check_mode(out: str, hooks: Hooks, sharded_model: bool) -> dict:
    root = f"{out}/run-{'sharded' if sharded_model else 'gathered'}"
    model, opt, sched = build(seed=0)
    train(model, opt, sched, 2)
    mgr = savepoint.CheckpointManager(root, async_save=True, sharded_model=sharded_model, dist_timeout=60)
    ref = gathered(model, opt, sched)

    hooks.hold, hooks.release = True, threading.Event()
    hooks.deferred.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "this save is synchronous" warning
        mgr.save(2, model=model, optimizer=opt, scheduler=sched)
    train(model, opt, sched)  # changes weights, moments and the schedule before the write starts
    hooks.release.set()
    train(model, opt, sched)  # ... and while it runs
    mgr.wait()
    hooks.hold = False
    changed = gathered(model, opt, sched)
    assert dist.get_rank() != 0 or any(
        not torch.equal(changed[k], ref[k]) for k in ref if k.startswith("model/")
    )
    assert not torch.equal(changed["sched/last_epoch"], ref["sched/last_epoch"])

    hooks.fail = {3, 5}
    mgr.save(3, model=model, optimizer=opt, scheduler=sched)  # returns: the failure happens in the background
    expect_failure(mgr.wait, 3)
    mgr.save(5, model=model, optimizer=opt, scheduler=sched)
    expect_failure(lambda: mgr.save(6, model=model, optimizer=opt, scheduler=sched), 5)
    hooks.fail = set()
    mgr.close()
    steps = [i.step for i in mgr.checkpoints]
    assert steps == [2], steps

    fresh, fresh_opt, fresh_sched = build(seed=1)
    restored_mgr = savepoint.CheckpointManager(root, dist_timeout=60)
    assert restored_mgr.restore(model=fresh, optimizer=fresh_opt, scheduler=fresh_sched).step == 2
    restored = gathered(fresh, fresh_opt, fresh_sched)
    assert_same(ref, restored, where=f"rank {dist.get_rank()}, sharded_model={sharded_model}")
    return {"restored_step": 2, "tensors_compared": len(ref), "deferred_gather": hooks.deferred[0]}


def check_reuse(out: str, hooks: Hooks) -> dict:
    model, opt, sched = build(seed=0)
    train(model, opt, sched)
    root = f"{out}/run-many"
    mgr = savepoint.CheckpointManager(root, async_save=True, sharded_model=True, keep_last=2, dist_timeout=60)
    hooks.pointers.clear()
    sizes = []
    for step in range(1, REPEATS + 1):
        mgr.save(step, model=model, optimizer=opt, scheduler=sched)
        train(model, opt, sched)
        sizes.append(pool_for(root).nbytes)
    mgr.close()
    assert len(set(hooks.pointers)) == 1, f"{len(set(hooks.pointers))} different sets of host buffers"
    assert len(set(sizes)) == 1, sizes
    return {"saves": len(hooks.pointers), "pool_bytes": sizes[-1]}


def check_uneven_rows() -> None:
    """The background gather puts uneven shards back in place: 5 rows over 2 ranks (3 + 2), 1 row (1 + 0)
    and bf16, as torch's own `full_tensor()` does."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    whole = {
        "odd": torch.arange(15.0).reshape(5, 3),
        "one": torch.arange(4.0).reshape(1, 4),
        "bf16": torch.randn(7, 2, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16),
    }
    shards = {name: distribute_tensor(t, mesh, [Shard(0)]) for name, t in whole.items()}
    got = gather_rows(shards, timeout=60, what="test")
    if dist.get_rank() == 0:
        for name, t in whole.items():
            assert torch.equal(got[name], t) and torch.equal(got[name], shards[name].full_tensor()), name
    else:
        assert got == {}, got
        for t in shards.values():
            t.full_tensor()  # rank 0's comparison is collective


def main(out: str) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(100 + dist.get_rank())
    check_uneven_rows()
    hooks = Hooks()
    result = {
        "gathered": check_mode(out, hooks, sharded_model=False),
        "sharded": check_mode(out, hooks, sharded_model=True),
        "reuse": check_reuse(out, hooks),
    }
    gather_results(out, result)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
