"""Run under `torchrun --nproc_per_node=2` (gloo, CPU): `async_save=True` with DeepSpeed ZeRO engines.

For each stage given: a synchronous savepoint save of step 2 (the same code, written at once from
the live state); then the async save() of the same state returns while its write is held back (the
write waits for a signal the training thread sends only after save() returned, and fails if it never
comes), with no warning; then DeepSpeed's own `engine.save_checkpoint` of that state goes to a plain
directory. Training changes the weights, the optimizer and the schedule before the write starts and
while it runs. The engine files of both savepoint checkpoints must be byte for byte DeepSpeed's own,
and the async one's model.safetensors the save-time weights. A fresh engine restored from it must hold
the save-time state (weights, every optimizer tensor, schedule), as must a fresh engine that
DeepSpeed's own `load_checkpoint` loaded from its directory, and both must train on identically. Then
a failure in rank 1's background write (a directory where its partition file goes) is raised on both ranks by wait() and
by the next save(), and nothing is committed for it; a few saves in a row reuse the same host buffers.
Rank 0 writes OUT/result.json.
"""

from __future__ import annotations

import filecmp
import os
import sys
import threading
import warnings

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from tests.distributed.common import assert_same, gather_results
from tests.distributed.worker_deepspeed import build, train

import savepoint
from savepoint.distributed import DistributedSaveError
from savepoint.errors import StorageError
from savepoint.integrations import deepspeed_snapshot
from savepoint.integrations.deepspeed import full_state
from savepoint.pipeline import save as pipeline_save

REPEATS = 3


class Hooks:
    """Holds every rank's background write until released; fails rank 1's engine-file write for the
    steps in `fail`; records the host pointers of the engine files each save writes."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.hold = False
        self.fail: set[int] = set()
        self.step = 0
        self.pointers: list[frozenset[tuple[str, int]]] = []
        real_write_files = pipeline_save.write_files
        real_engine_files = deepspeed_snapshot.write_engine_files

        def write_files(job, staged):
            if self.hold and not self.release.wait(timeout=60):
                raise AssertionError("the write was never released: save() did not return before it")
            self.step = job.request.step
            return real_write_files(job, staged)

        def write_engine_files(files, staged, base):
            if dist.get_rank() == 1 and self.step in self.fail:  # a directory where its partition goes
                victim = next(p for p in files.states if p.endswith("_optim_states.pt"))
                os.makedirs(staged.abspath(f"{base}/{victim}"))
            by_name = {rel.split("/", 1)[1]: state for rel, state in files.states.items()}  # no tag
            self.pointers.append(frozenset(pointers(by_name).items()))
            return real_engine_files(files, staged, base)

        pipeline_save.write_files = write_files
        deepspeed_snapshot.write_engine_files = write_engine_files


def pointers(value, where: str = "") -> dict[str, int]:
    """Where each tensor sits in a saved state -> the address of its storage."""
    if isinstance(value, torch.Tensor):
        return {where: value.untyped_storage().data_ptr()}
    items = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, (list, tuple))
        else []
    )
    return {k: v for key, item in items for k, v in pointers(item, f"{where}/{key}").items()}


def flatten(value, prefix: str, out: dict[str, torch.Tensor]) -> None:
    if isinstance(value, torch.Tensor):
        out[prefix] = value.detach().clone()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out[prefix] = torch.tensor(float(value), dtype=torch.float64)
    elif isinstance(value, dict):
        for key, item in value.items():
            flatten(item, f"{prefix}/{key}", out)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            flatten(item, f"{prefix}/{i}", out)


def state_of(engine) -> dict[str, torch.Tensor]:
    """The engine's weights (gathered, rank 0), this rank's optimizer state and the schedule. Collective."""
    out = {f"weights/{k}": v.clone() for k, v in full_state(engine).items()}
    flatten(engine.optimizer.state_dict(), "optimizer", out)
    flatten(engine.lr_scheduler.state_dict(), "scheduler", out)
    out["global_steps"] = torch.tensor(engine.global_steps)
    return out


def expect_failure(call, step: int) -> None:
    try:
        call()
    except (StorageError, DistributedSaveError) as exc:  # rank 1: its own error; rank 0: rank 1's
        assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in str(exc), exc
        assert dist.get_rank() == 1 or "rank 1" in str(exc), exc
        return
    raise AssertionError(f"rank {dist.get_rank()}: the failed background save of step {step} was not raised")


def check_stage(stage: int, out: str, hooks: Hooks) -> dict:
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(20 + rank)
    batches = [torch.randint(3, 512, (2, 16), generator=g) for _ in range(8)]
    root, theirs = f"{out}/zero{stage}", f"{out}/theirs-zero{stage}"
    engine = build(stage, seed=0)
    train(engine, batches[:2])
    mgr = savepoint.CheckpointManager(root, async_save=True, dist_timeout=60)
    # A synchronous save of the same state first: the same code, written at once from the live tensors.
    savepoint.CheckpointManager(f"{root}-sync", dist_timeout=60).save(2, model=engine)

    hooks.hold, hooks.release = True, threading.Event()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mgr.save(2, model=engine)
    assert not [w for w in caught if "synchronous" in str(w.message)], [str(w.message) for w in caught]
    ref = state_of(engine)
    engine.save_checkpoint(theirs, tag="global_step2", save_latest=False)  # DeepSpeed's own, same state
    train(engine, batches[2:3])  # weights, moments and schedule change before the write starts
    hooks.release.set()
    train(engine, batches[3:4])  # ... and while it runs
    mgr.wait()
    hooks.hold = False
    changed = state_of(engine)
    assert any(not torch.equal(changed[k], ref[k]) for k in ref if k.startswith("optimizer/")), "no change"

    # The engine files are the bytes DeepSpeed itself wrote for that state.
    names = sorted(n for n in os.listdir(f"{theirs}/global_step2") if not n.endswith(".py"))
    for ours in (root, f"{root}-sync"):
        ours = f"{ours}/step-00000002/train_state/deepspeed/global_step2"
        assert sorted(os.listdir(ours)) == names, (os.listdir(ours), names)
        for name in names:
            assert filecmp.cmp(f"{ours}/{name}", f"{theirs}/global_step2/{name}", shallow=False), ours

    if rank == 0:  # the 16-bit weights of the transformers directory (ZeRO-2: the live parameters)
        weights = load_file(f"{root}/step-00000002/model.safetensors")
        assert weights and all(torch.equal(t, ref[f"weights/{k}"]) for k, t in weights.items())

    hooks.fail = {3, 5}
    mgr.save(3, model=engine)  # returns: the failure happens in the background
    expect_failure(mgr.wait, 3)
    mgr.save(5, model=engine)
    expect_failure(lambda: mgr.save(6, model=engine), 5)
    hooks.fail = set()
    hooks.pointers.clear()
    for step in range(10, 10 + REPEATS):
        mgr.save(step, model=engine)
        train(engine, batches[4:5])
    mgr.close()
    steps = [i.step for i in mgr.checkpoints]
    assert steps == [2, 10, 11, 12], steps
    assert not [n for n in os.listdir(root) if n.startswith(".tmp")], os.listdir(root)  # failed saves: gone
    moved = {k for p in hooks.pointers for k, v in p if v != dict(hooks.pointers[0]).get(k)}
    assert not moved, f"host buffers not reused for {sorted(moved)[:5]}"

    restored = build(stage, seed=1)  # other weights: the restore must replace them all
    assert savepoint.CheckpointManager(root, dist_timeout=60).restore(model=restored, step=2).step == 2
    assert_same(ref, state_of(restored), where=f"rank {rank}, zero{stage}, restored")
    loaded = build(stage, seed=1)
    loaded.load_checkpoint(theirs, tag="global_step2")
    assert_same(ref, state_of(loaded), where=f"rank {rank}, zero{stage}, DeepSpeed's own load")
    ours_losses, their_losses = train(restored, batches[5:]), train(loaded, batches[5:])
    assert ours_losses == their_losses, (ours_losses, their_losses)
    return {"compared": len(ref), "files": len(names), "losses": ours_losses}


def main(out: str, *stages: str) -> None:
    dist.init_process_group("gloo")
    hooks = Hooks()
    mine = {f"zero{s}": check_stage(int(s), out, hooks) for s in stages}
    gather_results(out, mine)
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as worker_deepspeed.py: skip an interpreter shutdown DeepSpeed's CPU threads can abort


if __name__ == "__main__":
    main(sys.argv[1], *sys.argv[2:])
