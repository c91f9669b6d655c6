"""One rank of a 2-node job (`torchrun --nnodes=2 --nproc-per-node=N`) on an FSDP2-sharded plain
`nn.Sequential` (argv: MODE BASE ROOT TIMEOUT).

ROOT is the checkpoint root path string every rank is given. The test decides what is behind it:
one shared directory (the control), or a different directory per node (a bind mount in a private
mount namespace, or a relative path resolved against each node's own working directory).

Modes:
  separate   save step 1 under BASE/shared (a genuinely shared root), then step 2 under ROOT: every rank
             must fail. Then three restores from ROOT: with nothing anywhere (step 0 is right), with a
             copy of step 1 on node 1's disk only, and with it on node 0's disk only (both must fail:
             no rank may silently start at step 0 while a checkpoint exists for some rank).
  save       (control) train 2 steps, save step 2 under ROOT, train 2 more; write the losses and this
             rank's final shards to BASE/out-save-<rank>.safetensors.
  resume     (control) restore from ROOT into a fresh model, train 2 steps; write the same to
             BASE/out-resume-<rank>.safetensors.
Each rank prints `RESULT <key>@<rank> <outcome> <seconds> <message>` lines and exits 0.
"""

from __future__ import annotations

import os
import shutil
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from tests.distributed.worker_coordination import attempt, build, local_state, train

import savepoint


def copy_step1(base: str, root: str) -> None:
    os.makedirs(root, exist_ok=True)
    shutil.copytree(f"{base}/shared/step-00000001", f"{root}/step-00000001")


def separate(base: str, root: str, timeout: float) -> None:
    rank, node = dist.get_rank(), int(os.environ["GROUP_RANK"])
    copier = int(os.environ["LOCAL_RANK"]) == 0  # one rank per node changes that node's disk
    model, opt = build()
    train(model, opt, 1)
    savepoint.CheckpointManager(f"{base}/shared", dist_timeout=timeout).save(1, model=model, optimizer=opt)
    train(model, opt, 2)
    attempt(
        f"save@{rank}",
        lambda: savepoint.CheckpointManager(root, dist_timeout=timeout).save(2, model=model, optimizer=opt),
    )

    def restore() -> object:
        return savepoint.CheckpointManager(root, dist_timeout=timeout).restore(model=model, optimizer=opt)

    attempt(f"restore-empty@{rank}", restore)
    dist.barrier()
    if copier and node == 1:
        copy_step1(base, root)
    dist.barrier()
    attempt(f"restore-node1-only@{rank}", restore)
    dist.barrier()
    if copier:
        if node == 1:
            shutil.rmtree(f"{root}/step-00000001")
        else:
            copy_step1(base, root)
    dist.barrier()
    attempt(f"restore-node0-only@{rank}", restore)
    dist.barrier()
    if copier and node == 0:
        shutil.rmtree(f"{root}/step-00000001")


def record(path: str, model: torch.nn.Module, opt: torch.optim.Optimizer, losses: list[float]) -> None:
    state = local_state(model, opt)
    state["losses"] = torch.tensor(losses, dtype=torch.float64)
    save_file({k: v.contiguous() for k, v in state.items()}, path)


def steps(model: torch.nn.Module, opt: torch.optim.Optimizer, seeds: range) -> list[float]:
    losses = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed * 10 + dist.get_rank())
        loss = model(torch.randn(4, 8, generator=g)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def main(mode: str, base: str, root: str, timeout: float) -> int:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if mode == "separate":
        separate(base, root, timeout)
    elif mode == "save":
        model, opt = build()
        steps(model, opt, range(1, 3))
        mgr = savepoint.CheckpointManager(root, dist_timeout=timeout)
        attempt(f"save@{rank}", lambda: mgr.save(2, model=model, optimizer=opt))
        record(f"{base}/out-save-{rank}.safetensors", model, opt, steps(model, opt, range(3, 5)))
    elif mode == "resume":
        torch.manual_seed(1234)  # other weights than `build()` gives: the restore must replace them all
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        mgr = savepoint.CheckpointManager(root, dist_timeout=timeout)
        attempt(f"restore@{rank}", lambda: mgr.restore(model=model, optimizer=opt))
        record(f"{base}/out-resume-{rank}.safetensors", model, opt, steps(model, opt, range(3, 5)))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])))
