"""Restart from memory: restore from the memory tier (/dev/shm) against a cold and a warm disk restore.

    python -m benchmarks.bench_memory_tier [--quick] [--reps N] [--workdir DIR]

One checkpoint of a model + AdamW state is saved with `memory_tier=True`, as a crashed run leaves it.
Each repetition then times, alternating, what a restarted process pays in `CheckpointManager.restore`:
- cold disk: the page cache emptied first (root only), the manager without a tier;
- warm disk: the checkpoint's files already in the page cache (the cold run just read them), no tier;
- memory tier: a manager with `memory_tier=True`, the page cache emptied first as after a restart
  (tmpfs pages are not page cache: they stay).
Every path checks every file against the manifest as it reads it.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable

import torch

import savepoint
from benchmarks import models
from benchmarks.common import GB, Table, drop_caches, median, remove, spread
from savepoint.manifest import read_manifest
from savepoint.storage import memory_tier

TITLE = "Restart from memory: restore from the memory tier vs the disk"


def restart(
    model: torch.nn.Module, opt: torch.optim.Optimizer, workdir: str, reps: int
) -> tuple[Table, dict[str, float]]:
    root = os.path.join(workdir, "memory-tier")
    saver = savepoint.CheckpointManager(root, memory_tier=True)
    saver.save(1, model=model, optimizer=opt)
    saver.close(keep_memory_tier=True)  # as a crash leaves it
    size = read_manifest(os.path.join(root, "step-00000001")).total_size
    cold_ok = drop_caches()

    def restore(tier: bool, cold: bool) -> Callable[[], float]:
        def run() -> float:
            if cold:
                drop_caches()
            mgr = savepoint.CheckpointManager(root, memory_tier=tier)
            start = time.perf_counter()
            mgr.restore(model=model, optimizer=opt)
            elapsed = time.perf_counter() - start
            mgr.close(keep_memory_tier=True)
            return elapsed

        return run

    # In this order, "warm disk" finds what "cold disk" just read in the page cache, and "memory tier"
    # starts from an emptied page cache, as a restarted process on a busy machine would.
    methods = {"warm disk": restore(False, cold=False), "memory tier": restore(True, cold=True)}
    if cold_ok:
        methods = {"cold disk": restore(False, cold=True), **methods}
    methods["warm disk"]()  # one untimed pass: imports, the allocator
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(reps):
        for name, run in methods.items():
            times[name].append(run())
    memory_tier.drop(root)
    remove(root)
    anchor = "cold disk" if cold_ok else "warm disk"
    rows = [
        {
            "restore from": name,
            "median s": median(ts),
            "min–max s": spread(ts),
            "GB/s": size / GB / median(ts),
            f"speed-up vs {anchor}": median(times[anchor]) / median(ts),
        }
        for name, ts in times.items()
    ]
    notes = [
        f"{size / GB:.2f} GB checkpoint (model + AdamW state), {reps} alternating repetitions, medians",
        "every path verifies each file's checksum as it reads it (the tier's against the disk's manifest)",
    ]
    if not cold_ok:
        notes.append("could not drop the page cache (not root?): no cold-disk numbers")
    stats = {
        "speedup_vs_cold": median(times[anchor]) / median(times["memory tier"]) if cold_ok else float("nan")
    }
    return Table(TITLE, rows, notes), stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    args = parser.parse_args()
    model, opt = models.train_state((models.QUICK if args.quick else models.FULL)["train_state"])
    workdir = tempfile.mkdtemp(prefix="savepoint-tier-", dir=args.workdir)
    try:
        table, _ = restart(model, opt, workdir, args.reps)
    finally:
        remove(workdir)
    print(table.markdown())


if __name__ == "__main__":
    main()
