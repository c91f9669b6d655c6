"""Run under `torchrun --nproc_per_node=4`: how many bytes rank 0 reads while `save()` commits.

A tiny Llama under FSDP2 with AdamW (optimizer state sharded: each rank writes its own DCP file) and
a per-rank StatefulDataLoader-like state. Rank 0 reads `/proc/self/io` (`rchar`: bytes read through
syscalls, page cache included) before and after the second save and writes `read_bytes.json` into OUT:
its read bytes against the size of its own files and of the other ranks' files in the checkpoint.
"""

from __future__ import annotations

import json
import re
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import savepoint
from savepoint.demo import tiny

_OTHER_RANK = re.compile(r"__(\d+)_\d+\.distcp$|rank-0*(\d+)")


def rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def owner(relpath: str) -> int:
    match = _OTHER_RANK.search(relpath)
    return int(next(g for g in match.groups() if g is not None)) if match else 0


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = tiny.tiny_llama(seed=0).train()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(3, 500, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    mgr = savepoint.CheckpointManager(f"{out}/run", keep_last=3, dist_timeout=120)
    mgr.save(1, model=model, optimizer=opt)  # warm-up: imports and first-use reads are not the commit's
    before = rchar()
    path = mgr.save(2, model=model, optimizer=opt)
    read = rchar() - before
    if rank == 0:
        with open(f"{path}/savepoint.json") as f:
            files = json.load(f)["files"]
        sizes = {p: entry["size"] for p, entry in files.items()}
        own = sum(s for p, s in sizes.items() if owner(p) == 0)
        others = sum(s for p, s in sizes.items() if owner(p) != 0)
        result = {
            "world": dist.get_world_size(),
            "rank0_read": read,
            "rank0_own_bytes": own,
            "others_bytes": others,
        }
        print(json.dumps(result))
        with open(f"{out}/read_bytes.json", "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
