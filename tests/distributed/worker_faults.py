"""One rank of a 2-rank FSDP2 job whose rank 1 fails during the second save (argv: ROOT MODE TIMEOUT).

MODE is `kill` (rank 1 SIGKILLs itself while writing its files), `raise` (it raises) or `hang` (it
stalls), or `kill-restore` (both save twice, then rank 1 SIGKILLs itself while reading its DCP shards
during the restore). Started by the test as two plain processes with RANK/WORLD_SIZE set, not by torchrun:
torchrun's agent would itself SIGTERM the survivor when a rank dies, hiding what savepoint does.
Each rank prints `RESULT <outcome> <seconds>` and exits 0 (save committed) or 3 (save raised).
"""

from __future__ import annotations

import os
import signal
import sys
import time
import warnings

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import savepoint
from savepoint.demo import tiny
from savepoint.formats import dcp_reader, train_state

ORIGINAL_WRITE_BLOB = train_state.write_blob


def inject(mode: str) -> None:
    original = ORIGINAL_WRITE_BLOB

    def faulty(staged, relbase, doc, tensors):
        if "/rng/" in relbase:
            if mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if mode == "raise":
                raise RuntimeError("injected fault while writing rank 1's RNG state")
            time.sleep(3600)
        return original(staged, relbase, doc, tensors)

    train_state.write_blob = faulty


def main(root: str, mode: str, timeout: float) -> int:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = tiny.tiny_llama(seed=0)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(3, 512, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    mgr = savepoint.CheckpointManager(root, dist_timeout=timeout)
    mgr.save(1, model=model, optimizer=opt)
    if mode == "kill-restore":
        return restore_while_a_rank_dies(mgr, model, opt)
    if rank == 1:
        inject(mode)
    start = time.monotonic()
    try:
        mgr.save(2, model=model, optimizer=opt)
    except Exception as exc:
        print(
            f"RESULT {type(exc).__name__} {time.monotonic() - start:.1f} {exc}", file=sys.stderr, flush=True
        )
        if mode == "raise":  # every rank is alive: the next save must work
            train_state.write_blob = ORIGINAL_WRITE_BLOB
            mgr.save(3, model=model, optimizer=opt)
            # As torch's docs ask of every job whose ranks are all alive. Without it, gloo's worker threads
            # can still hold finished work at interpreter teardown: a SIGABRT ("terminate called without
            # an active exception") after the job's result, now and then (torch issue 190489).
            dist.destroy_process_group()
        return 3
    print(f"RESULT committed {time.monotonic() - start:.1f}", file=sys.stderr, flush=True)
    return 0


def restore_while_a_rank_dies(mgr: savepoint.CheckpointManager, model, opt) -> int:  # type: ignore[no-untyped-def]
    mgr.save(2, model=model, optimizer=opt)
    if dist.get_rank() == 1:

        def die(self, plan, planner):  # type: ignore[no-untyped-def]
            os.kill(os.getpid(), signal.SIGKILL)

        dcp_reader.VerifiedReader.read_data = die
    start = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            mgr.restore(model=model, optimizer=opt)
        except Exception as exc:
            fell_back = any("falls back" in str(w.message) for w in caught)
            print(
                f"RESULT {type(exc).__name__} {time.monotonic() - start:.1f} fell_back={fell_back} {exc}",
                file=sys.stderr,
                flush=True,
            )
            return 3
    print(f"RESULT restored {time.monotonic() - start:.1f}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
