"""Run under `torchrun --nproc_per_node=2`: `async_save=True` with a DDP model.

Every rank's save() returns after the snapshot; the write, report and commit run on a background
thread. Checks: training changes the live weights while the save is in flight, yet the checkpoint
holds the save-time state; a background failure on rank 1 is raised by wait() on both ranks (rank 1's
own error, rank 0 a DistributedSaveError) and commits nothing; a failure is raised by the next save()
too, which then saves nothing; saves after a failure work again. Rank 0 writes OUT/ref.safetensors
(the state at save time); the checkpoints go to OUT/run. Then `async_save="process"` (OUT/proc): it
says once that under torchrun it writes on a thread, starts no writer process, and its save() returns
before the write starts (the write waits for that), committing the save-time state.
"""

from __future__ import annotations

import sys
import threading
import warnings

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from tests.distributed.common import assert_same, plain_reference
from torch.nn.parallel import DistributedDataParallel

import savepoint
from savepoint.distributed import DistributedSaveError
from savepoint.pipeline import save as pipeline_save


class InjectedWriteError(RuntimeError):
    pass


def train_step(model, opt) -> None:
    ids = torch.randint(3, 512, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()


def failing_on_rank1(real):
    def write_files(job, staged):
        if dist.get_rank() == 1 and job.request.step in (3, 5):
            raise InjectedWriteError(f"injected failure writing step {job.request.step}")
        return real(job, staged)

    return write_files


def expect_failure(call, step: int) -> None:
    expected = InjectedWriteError if dist.get_rank() == 1 else DistributedSaveError
    try:
        call()
    except expected as exc:
        assert dist.get_rank() == 1 or "rank 1" in str(exc), exc
        return
    raise AssertionError(f"rank {dist.get_rank()}: the failed background save of step {step} was not raised")


def main(out: str) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(dist.get_rank())
    from savepoint.demo import tiny

    inner = tiny.tiny_gpt2(seed=0).train()
    model = DistributedDataParallel(inner)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_step(model, opt)
    root = f"{out}/run"
    mgr = savepoint.CheckpointManager(root, async_save=True, dist_timeout=60)

    ref = plain_reference(inner, opt)
    mgr.save(1, model=model, optimizer=opt)
    for _ in range(2):  # the live state changes while the save is (or may be) in flight
        train_step(model, opt)
    mgr.wait()
    if dist.get_rank() == 0:
        save_file(ref, f"{out}/ref.safetensors")

    real_write_files = pipeline_save.write_files
    pipeline_save.write_files = failing_on_rank1(real_write_files)
    mgr.save(3, model=model, optimizer=opt)  # returns: the failure happens in the background
    expect_failure(mgr.wait, 3)
    mgr.save(5, model=model, optimizer=opt)
    expect_failure(lambda: mgr.save(6, model=model, optimizer=opt), 5)  # raised, and 6 is not saved
    mgr.save(7, model=model, optimizer=opt)
    mgr.close()
    assert [i.step for i in mgr.checkpoints] == [1, 7], mgr.checkpoints

    fresh = tiny.tiny_gpt2(seed=1)
    model = DistributedDataParallel(fresh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    assert (
        savepoint.CheckpointManager(root, dist_timeout=60).restore(model=model, optimizer=opt, step=1).step
        == 1
    )
    assert_same(ref, plain_reference(fresh, opt), where=f"rank {dist.get_rank()}")
    process_mode_writes_on_a_thread(out, model, opt, real_write_files)
    dist.barrier()
    dist.destroy_process_group()


def process_mode_writes_on_a_thread(out: str, model, opt, real_write_files) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mgr = savepoint.CheckpointManager(f"{out}/proc", async_save="process", dist_timeout=60)
    said = [str(w.message) for w in caught if "writer thread" in str(w.message)]
    assert len(said) == 1, [str(w.message) for w in caught]
    assert not getattr(mgr._writer, "out_of_process", False)  # no writer process on any rank

    returned = threading.Event()
    waited: list[bool] = []

    def write_after_save_returned(job, staged):
        waited.append(returned.wait(timeout=30))  # a synchronous save would wait here in vain
        return real_write_files(job, staged)

    pipeline_save.write_files = write_after_save_returned
    ref = plain_reference(model.module, opt)
    mgr.save(2, model=model, optimizer=opt)
    returned.set()
    train_step(model, opt)  # the live state changes while the write is in flight
    mgr.close()
    pipeline_save.write_files = real_write_files
    assert waited == [True], waited
    from savepoint.demo import tiny

    fresh = DistributedDataParallel(tiny.tiny_gpt2(seed=2))
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    savepoint.CheckpointManager(f"{out}/proc", dist_timeout=60).restore(model=fresh, optimizer=fresh_opt)
    assert_same(ref, plain_reference(fresh.module, fresh_opt), where=f"rank {dist.get_rank()}, process mode")


if __name__ == "__main__":
    main(sys.argv[1])
