"""One rank of a 2-rank job on an FSDP2-sharded plain `nn.Sequential` (argv: MODE DIR TIMEOUT).

Modes:
  unshared   step 1 goes to DIR/shared; step 2 to DIR/rank-<r>, one directory per rank (what two nodes
             with separate local disks under the same path see): save must fail on every rank.
  same-path  the same, with step 2 under DIR/root on both ranks, which the test bind-mounts to a
             different directory per rank (`unshare -m`): one path string, two disks.
  agreement  steps 1 and 2 go to DIR/a; rank 0 copies DIR/a to DIR/b without step 2 (a root that lags).
             Then restores with rank 0 on a and rank 1 on b (must fail on both), with rank 0 on b and
             rank 1 on a (both restore step 1), and on a (step 2, exactly), then save_pretrained.
  kill-gather / kill-export
             rank 1 SIGKILLs itself inside the weight gather of a save / a save_pretrained.
Started by the test as two plain processes (RANK/WORLD_SIZE set), not by torchrun, whose agent would
SIGTERM the survivor. Each rank prints `RESULT <key> <outcome> <seconds> <message>` lines and exits 0.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import savepoint


def report(key: str, outcome: str, start: float, message: str = "") -> None:
    flat = " ".join(message.split())[:3000]
    # One write(2) per line: ranks of a node share stderr, and print's separate writes could interleave.
    os.write(2, f"RESULT {key} {outcome} {time.monotonic() - start:.1f} {flat}\n".encode())


def attempt(key: str, fn) -> object:
    start = time.monotonic()
    try:
        out = fn()
    except Exception as exc:
        report(key, type(exc).__name__, start, str(exc))
        return exc
    report(key, "ok", start, str(getattr(out, "step", out)))
    return out


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed + dist.get_rank())
    model(torch.randn(4, 8, generator=g)).square().mean().backward()
    opt.step()
    opt.zero_grad()


def local_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """This rank's shards of the weights and the AdamW moments (the same sharding on save and restore)."""
    out = {f"model/{n}": p.to_local().detach().clone() for n, p in model.named_parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    for p, entry in opt.state.items():
        for key, value in entry.items():
            value = value.to_local() if isinstance(value, DTensor) else value
            out[f"optim/{names[id(p)]}/{key}"] = value.detach().clone()
    return out


def same(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> str:
    differ = [k for k in expected if k not in actual or not torch.equal(expected[k], actual[k])]
    return "exact" if not differ else f"differs:{','.join(differ)}"


def kill_on_full_tensor() -> None:
    def die(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    DTensor.full_tensor = die  # rank 1 dies inside the gather; rank 0 is waiting in it


def main(mode: str, base: str, timeout: float) -> int:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, opt = build()
    train(model, opt, 1)
    if mode in ("unshared", "same-path"):
        savepoint.CheckpointManager(f"{base}/shared", dist_timeout=timeout).save(
            1, model=model, optimizer=opt
        )
        # same-path: DIR/root is each rank's own DIR/disk-<r>, bind-mounted in a private mount namespace
        mine = f"{base}/rank-{rank}" if mode == "unshared" else f"{base}/root"
        mgr = savepoint.CheckpointManager(mine, dist_timeout=timeout)
        attempt("save", lambda: mgr.save(2, model=model, optimizer=opt))
    elif mode == "agreement":
        shared = savepoint.CheckpointManager(f"{base}/a", dist_timeout=timeout)
        shared.save(1, model=model, optimizer=opt)
        at_step1 = local_state(model, opt)
        train(model, opt, 2)
        shared.save(2, model=model, optimizer=opt)
        at_step2 = local_state(model, opt)
        if rank == 0:
            shutil.copytree(
                f"{base}/a", f"{base}/b", ignore=shutil.ignore_patterns("step-00000002", ".savepoint*")
            )
            shutil.copytree(f"{base}/a", f"{base}/c", ignore=shutil.ignore_patterns(".savepoint*"))
            with open(f"{base}/c/step-00000002/model.safetensors", "r+b") as f:  # damage only rank 1 sees
                f.seek(-4, os.SEEK_END)
                f.write(b"\xff\xfe\xfd\xfc")
        dist.barrier()
        train(model, opt, 3)
        mine, other = ("a", "b") if rank == 0 else ("b", "a")
        attempt(
            "ahead",
            lambda: savepoint.CheckpointManager(f"{base}/{mine}", dist_timeout=timeout).restore(
                model=model, optimizer=opt
            ),
        )
        out = attempt(
            "behind",
            lambda: savepoint.CheckpointManager(f"{base}/{other}", dist_timeout=timeout).restore(
                model=model, optimizer=opt
            ),
        )
        print(f"RESULT behind-state {same(at_step1, local_state(model, opt))} 0", file=sys.stderr, flush=True)
        train(model, opt, 4)
        damaged = f"{base}/a" if rank == 0 else f"{base}/c"
        attempt(
            "damaged",
            lambda: savepoint.CheckpointManager(damaged, dist_timeout=timeout).restore(
                model=model, optimizer=opt
            ),
        )
        print(
            f"RESULT damaged-state {same(at_step1, local_state(model, opt))} 0", file=sys.stderr, flush=True
        )
        attempt("shared", lambda: shared.restore(model=model, optimizer=opt))
        print(f"RESULT shared-state {same(at_step2, local_state(model, opt))} 0", file=sys.stderr, flush=True)
        attempt("export", lambda: savepoint.save_pretrained(model, f"{base}/export"))
        full = {n: t.full_tensor() for n, t in model.state_dict().items()}  # collective
        if rank == 0:
            from safetensors.torch import load_file

            exported = load_file(f"{base}/export/model.safetensors")
            print(f"RESULT export-state {same(full, exported)} 0", file=sys.stderr, flush=True)
        groups = len(savepoint.distributed._GROUPS)  # one coordination group for saves, restores, export
        print(f"RESULT groups {groups} 0", file=sys.stderr, flush=True)
        del out
    elif mode in ("kill-gather", "kill-export"):
        mgr = savepoint.CheckpointManager(f"{base}/shared", dist_timeout=timeout)
        mgr.save(1, model=model, optimizer=opt)
        if rank == 1:
            kill_on_full_tensor()
        if mode == "kill-gather":
            attempt("save", lambda: mgr.save(2, model=model, optimizer=opt))
        else:
            attempt("export", lambda: savepoint.save_pretrained(model, f"{base}/export"))
        sys.stderr.flush()
        os._exit(0)  # the peer is gone: tearing down the process group could abort
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
