"""Restore: savepoint (verify checksums, then load in place) vs DCP load vs plain safetensors/torch loads."""

from __future__ import annotations

import glob
import os
import time
import warnings
from collections.abc import Callable

import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp

import savepoint
from benchmarks.bench_save import dcp_save, flat_tensors, torch_save
from benchmarks.common import GB, Table, drop_caches, median, remove, spread
from savepoint.pipeline.restore_entry import restore_checkpoint


def restore(
    model: torch.nn.Module, opt: torch.optim.Optimizer, workdir: str, reps: int
) -> tuple[Table, dict[str, float]]:
    """Restore model + optimizer state, cold (page cache dropped) and warm, alternating methods."""
    paths = _write_sources(model, opt, workdir)
    size = sum(t.numel() * t.element_size() for t in flat_tensors([model.state_dict(), opt.state_dict()]))
    methods = _methods(model, opt, paths)
    cold_ok = drop_caches()
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(reps):
        for name, fn in methods.items():
            for temp in ("cold", "warm") if cold_ok else ("warm",):
                if temp == "cold":
                    drop_caches()
                else:
                    fn()  # bring the files into the page cache
                start = time.perf_counter()
                fn()
                times.setdefault((name, temp), []).append(time.perf_counter() - start)
    for p in paths.values():
        remove(p)
    rows = [
        {
            "method": name,
            "cache": temp,
            "median s": median(ts),
            "min–max s": spread(ts),
            "GB/s": size / GB / median(ts),
            "× DCP load": median(ts) / median(times[("DCP load", temp)]),
        }
        for (name, temp), ts in times.items()
    ]
    notes = ["savepoint restore verifies every file's xxh3-128 checksum before it deserializes anything"]
    if not cold_ok:
        notes.append("could not drop the page cache (not root?): warm numbers only")
    stats = {
        f"{temp}_ratio": median(times[("savepoint restore", temp)]) / median(times[("DCP load", temp)])
        for temp in ("cold", "warm")
        if ("DCP load", temp) in times
    }
    return Table(f"Restore model + AdamW state ({size / GB:.2f} GB)", rows, notes), stats


def _write_sources(model: torch.nn.Module, opt: torch.optim.Optimizer, workdir: str) -> dict[str, str]:
    paths = {k: os.path.join(workdir, f"restore-{k}") for k in ("savepoint", "dcp", "torch")}
    savepoint.CheckpointManager(paths["savepoint"]).save(1, model=model, optimizer=opt)
    dcp_save(paths["dcp"], {"model": model.state_dict(), "optim": opt.state_dict()})
    torch_save(paths["torch"], {"model": model.state_dict(), "optim": opt.state_dict()})
    return paths


def _methods(
    model: torch.nn.Module, opt: torch.optim.Optimizer, paths: dict[str, str]
) -> dict[str, Callable[[], object]]:
    ckpt = os.path.join(paths["savepoint"], "step-00000001")
    files = sorted(glob.glob(os.path.join(ckpt, "**", "*.safetensors"), recursive=True))

    def dcp_load() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=paths["dcp"])

    def torch_load() -> None:
        state = torch.load(paths["torch"], weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])

    return {
        "savepoint restore": lambda: restore_checkpoint(ckpt, model=model, optimizer=opt),
        "DCP load": dcp_load,
        "safetensors load_file (same files, into new tensors)": lambda: [
            safetensors.torch.load_file(f) for f in files
        ],
        "torch.load + load_state_dict": torch_load,
    }
