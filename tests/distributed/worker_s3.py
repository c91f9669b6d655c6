"""Run under torchrun (one node with 2 ranks, or `--nnodes=2` with one rank each): FSDP2 training that
saves to and restores from an `s3://` root on a moto server (s3fs is pointed at it through FSSPEC_S3_*).

    worker_s3.py save ROOT OUT      train 2 steps, save step 2, record the reference, train 2 more
    worker_s3.py restore ROOT OUT   restore into other weights, check them, train 2 more
    worker_s3.py fail ROOT OUT      save step 3 while rank 1's upload fails part-way through
    worker_s3.py damaged ROOT OUT   restore step 2, whose objects were damaged: refused, nothing changed
    ... save ROOT OUT async         the save with `async_save=True`: it is committed once wait() returns

Each rank writes OUT/<mode>-rank<r>.json: what it staged, uploaded and downloaded (its own RemoteRoot's
counters), the losses, and the error it saw. Rank 0 writes OUT/ref.safetensors at save.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tests.distributed.common import assert_same
from tests.distributed.worker_fsdp2 import build, gathered, train

import savepoint


def main(mode: str, root: str, out: str, how: str = "sync") -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(100 + rank)
    mgr = savepoint.CheckpointManager(root, keep_last=2, dist_timeout=60, async_save=how == "async")
    remote = mgr._remote
    assert remote is not None
    report: dict = {
        "rank": rank,
        "world_size": dist.get_world_size(),
        "cache": os.environ.get("SAVEPOINT_CACHE"),
    }
    if mode == "save":
        model, opt, sched, loader = build(seed=0)
        batches = iter(loader)
        train(model, opt, sched, batches, 2)
        started = time.perf_counter()
        report["path"] = mgr.save(2, model=model, optimizer=opt, scheduler=sched, stateful={"data": loader})
        mgr.wait()  # a no-op for a synchronous manager
        report["save_s"] = time.perf_counter() - started
        # save() returned: the checkpoint lists on every rank, not only on rank 0
        report["listed_after_save"] = [i.step for i in mgr.checkpoints]
        report["staging_left"] = os.listdir(remote.staging_dir)
        ref = gathered(model, opt)
        if rank == 0:
            save_file(ref, f"{out}/ref.safetensors")
        report["losses"] = train(model, opt, sched, batches, 2)
    elif mode == "restore":
        model, opt, sched, loader = build(seed=1)  # other weights: the restore must replace them all
        torch.manual_seed(999)
        result = mgr.restore(model=model, optimizer=opt, scheduler=sched, stateful={"data": loader})
        report["step"] = result.step
        restored = gathered(model, opt)
        if rank == 0:
            assert_same(load_file(f"{out}/ref.safetensors"), restored, where="restored from s3")
        report["losses"] = train(model, opt, sched, iter(loader), 2)
    elif mode == "damaged":
        model, opt, sched, loader = build(seed=1)
        before = gathered(model, opt)
        try:
            mgr.restore(model=model, optimizer=opt, scheduler=sched, stateful={"data": loader}, step=2)
            report["error"] = None
        except savepoint.SavepointError as exc:
            report["error"] = f"{type(exc).__name__}: {exc}"
        after = gathered(model, opt)
        report["unchanged"] = all(torch.equal(before[k], after[k]) for k in before) if rank == 0 else None
    elif mode == "fail":
        model, opt, sched, loader = build(seed=0)
        train(model, opt, sched, iter(loader), 1)
        if rank == 1:
            fail_after_first_upload(remote.fs)
        try:
            mgr.save(3, model=model, optimizer=opt, scheduler=sched, stateful={"data": loader})
            report["error"] = None
        except savepoint.SavepointError as exc:
            report["error"] = f"{type(exc).__name__}: {exc}"
        report["listed_after_failure"] = [i.step for i in mgr.checkpoints]
    report["uploaded"] = remote.transfers["uploaded"]
    report["downloaded"] = remote.transfers["downloaded"]
    with open(f"{out}/{mode}-rank{rank}.json", "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


def fail_after_first_upload(fs) -> None:  # type: ignore[no-untyped-def]
    """Rank 1's network drops after one object: the others are uploaded, this one and the rest are not."""
    put_file, done = fs._put_file, []

    async def flaky_put_file(lpath, rpath, *args, **kwargs):  # type: ignore[no-untyped-def]
        if done:
            raise ConnectionError(f"connection reset while uploading {rpath}")
        done.append(rpath)
        return await put_file(lpath, rpath, *args, **kwargs)

    fs._put_file = flaky_put_file


if __name__ == "__main__":
    main(*sys.argv[1:5])
