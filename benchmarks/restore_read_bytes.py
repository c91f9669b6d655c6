"""Bytes one process reads to restore a checkpoint (model + AdamW + scheduler), against its size.

    python -m benchmarks.restore_read_bytes OUT_DIR

Saves a tiny Llama twice, restores step 1 (warm-up: imports and first-use reads are not the
restore's), then reads `/proc/self/io` (`rchar`: bytes read through syscalls, page cache included)
around the restore of step 2. Prints one JSON line: bytes read, checkpoint size, and their ratio (1.0:
each byte read once; a verify-then-read restore reads about 2.0).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import savepoint
from savepoint.demo import tiny


def rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def main(out: str) -> None:
    model = tiny.tiny_llama(seed=0, hidden_size=256, intermediate_size=704)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s))
    ids = torch.randint(3, 500, (2, 16))
    mgr = savepoint.CheckpointManager(f"{out}/run")
    for step in (1, 2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        mgr.save(step, model=model, optimizer=opt, scheduler=sched)
    mgr.restore(model=model, optimizer=opt, scheduler=sched, step=1)
    before = rchar()
    mgr.restore(model=model, optimizer=opt, scheduler=sched, step=2)
    read = rchar() - before
    files = json.loads((Path(out) / "run" / "step-00000002" / "savepoint.json").read_text())["files"]
    size = sum(e["size"] for e in files.values())
    print(json.dumps({"read_bytes": read, "checkpoint_bytes": size, "ratio": round(read / size, 3)}))


if __name__ == "__main__":
    main(sys.argv[1])
