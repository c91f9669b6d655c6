"""One rank of a 2-rank torchrun job (argv: OUT): what a restore reads, and damage found while reading.

An FSDP2-sharded plain `nn.Sequential` and its AdamW state are saved as DCP shards
(`sharded_model=True`) at steps 1 and 2. Then, on every rank, with `/proc/self/io` rchar around it:
  read      restore step 2 (after a warm-up restore of step 1, so imports are not counted);
  old       the same from a copy whose manifests list no item checksums (a checkpoint written before
            them: verified whole, then read);
  damaged   restore "latest" from a copy where bytes inside rank 1's shard file of step 2 are flipped:
            only rank 1 reads them, and every rank must fall back to step 1;
  full      restore from full weight files (a save without sharded_model) into the FSDP2 model.
Each rank writes OUT/rank-<r>.json with the bytes read, the sizes of the DCP files, and the outcomes.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from tests.distributed.common import write_json
from tests.distributed.worker_coordination import local_state, same
from torch.distributed.fsdp import fully_shard

import savepoint

DCP = "train_state/dcp"
RANGES = "train_state/dcp_ranges/"


def rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256))
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed + dist.get_rank())
    model(torch.randn(4, 256, generator=g)).square().mean().backward()
    opt.step()
    opt.zero_grad()


def measured(fn) -> tuple[object, int]:
    before = rchar()
    out = fn()
    return out, rchar() - before


def strip_range_records(step_dir: str) -> None:
    path = f"{step_dir}/savepoint.json"
    doc = json.loads(Path(path).read_text())
    doc["files"] = {p: e for p, e in doc["files"].items() if not p.startswith(RANGES)}
    with open(path, "w") as f:
        json.dump(doc, f)
    shutil.rmtree(f"{step_dir}/{RANGES}", ignore_errors=True)


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, opt = build()
    mgr = savepoint.CheckpointManager(f"{out}/run", sharded_model=True, dist_timeout=60)
    train(model, opt, 1)
    mgr.save(1, model=model, optimizer=opt)
    at1 = local_state(model, opt)
    train(model, opt, 2)
    mgr.save(2, model=model, optimizer=opt)
    at2 = local_state(model, opt)
    step2 = f"{out}/run/step-00000002"
    files = json.loads(Path(f"{step2}/savepoint.json").read_text())["files"]
    report: dict[str, object] = {
        "own_shard": files[f"{DCP}/__{rank}_0.distcp"]["size"],
        "all_shards": sum(e["size"] for p, e in files.items() if p.endswith(".distcp")),
        "checkpoint": sum(e["size"] for e in files.values()),
    }
    if rank == 0:
        ignore = shutil.ignore_patterns(".savepoint*")
        shutil.copytree(f"{out}/run", f"{out}/old", ignore=ignore)
        for step in ("step-00000001", "step-00000002"):
            strip_range_records(f"{out}/old/{step}")
        shutil.copytree(f"{out}/run", f"{out}/damaged", ignore=ignore)
        shard = f"{out}/damaged/step-00000002/{DCP}/__1_0.distcp"
        with open(shard, "r+b") as f:  # inside an item that only rank 1 reads at this world size
            f.seek(os.path.getsize(shard) // 2)
            f.write(b"\x00\xff\x00\xff")
    dist.barrier()

    mgr.restore(model=model, optimizer=opt, step=1)  # warm-up: imports and first-use costs
    train(model, opt, 3)
    result, report["read"] = measured(lambda: mgr.restore(model=model, optimizer=opt, step=2))
    report["read_step"], report["read_state"] = result.step, same(at2, local_state(model, opt))

    train(model, opt, 4)
    old = savepoint.CheckpointManager(f"{out}/old", dist_timeout=60)
    result, report["old"] = measured(lambda: old.restore(model=model, optimizer=opt, step=2))
    report["old_step"], report["old_state"] = result.step, same(at2, local_state(model, opt))

    train(model, opt, 5)
    damaged = savepoint.CheckpointManager(f"{out}/damaged", dist_timeout=60)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result, report["damaged"] = measured(lambda: damaged.restore(model=model, optimizer=opt))
    report["damaged_step"], report["damaged_state"] = result.step, same(at1, local_state(model, opt))
    report["warnings"] = [str(w.message) for w in caught if "damaged" in str(w.message)]

    # Full weight files (a save without sharded_model) into the FSDP2 model: every rank reads each
    # weight file once and keeps its shards; the optimizer moments still come from its DCP shard.
    full = savepoint.CheckpointManager(f"{out}/full", dist_timeout=60)
    full.save(2, model=model, optimizer=opt)
    at_full = local_state(model, opt)
    files = json.loads(Path(f"{out}/full/step-00000002/savepoint.json").read_text())["files"]
    report["full_weights"] = sum(e["size"] for p, e in files.items() if p.endswith(".safetensors"))
    report["full_own_shard"] = files[f"{DCP}/__{rank}_0.distcp"]["size"]
    full.restore(model=model, optimizer=opt, step=2)  # warm-up
    train(model, opt, 6)
    result, report["full"] = measured(lambda: full.restore(model=model, optimizer=opt, step=2))
    report["full_step"], report["full_state"] = result.step, same(at_full, local_state(model, opt))
    write_json(f"{out}/rank-{rank}.json", report)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
