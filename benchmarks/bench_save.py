"""Save throughput, async stall and dedupe: savepoint side by side with the libraries people use.

Every save is timed until durable (fsynced): a library that does not fsync gets an fsync of its files
inside the timing, since a checkpoint that is still in the page cache is not a checkpoint yet.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp

import savepoint
from benchmarks.common import GB, Table, alternate, fsync_tree, io_write_bytes, median, remove, spread
from savepoint.formats.hf import write_model_files
from savepoint.formats.safetensors_io import tensor_bytes
from savepoint.manifest import build_manifest
from savepoint.snapshot import release_buffers
from savepoint.storage.dedupe import DedupingStagedDir
from savepoint.storage.local import start_writeback

_CHUNK = 64 * 1024 * 1024


# ---------------------------------------------------------------- baselines


def raw_write(path: str, tensors: list[torch.Tensor], *, early_writeback: bool = False) -> None:
    """The disk's limit: the same bytes, one file, plain write() then fsync (optionally with the
    early writeback savepoint uses, to show what that alone is worth)."""
    with open(path, "wb") as f:
        offset = 0
        for t in tensors:
            view = tensor_bytes(t)
            for start in range(0, view.nbytes, _CHUNK):
                piece = view[start : start + _CHUNK]
                f.write(piece)
                if early_writeback:
                    f.flush()
                    start_writeback(f.fileno(), offset, piece.nbytes)
                offset += piece.nbytes
        f.flush()
        os.fsync(f.fileno())


def _then_fsync(path: str, save: Callable[..., object], *args: Any) -> None:
    save(*args)
    fsync_tree(path)


def torch_save(path: str, obj: Any) -> None:
    torch.save(obj, path)
    fsync_tree(path)


def dcp_save(path: str, state: dict[str, Any]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group": expected, DCP saves as a single rank
        dcp.save(state, checkpoint_id=path)  # FileSystemWriter fsyncs its files (sync_files=True)


def flat_tensors(state: Any) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in flat_tensors(v)]
    if isinstance(state, list | tuple):
        return [t for v in state for t in flat_tensors(v)]
    return []


# ---------------------------------------------------------------- sections


def save_model(model: torch.nn.Module, workdir: str, reps: int) -> tuple[Table, dict[str, float]]:
    """A bf16 model as a model directory: savepoint.save_pretrained vs the usual ways."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    size = sum(t.numel() * t.element_size() for t in state.values())
    methods: dict[str, Callable[[str], object]] = {
        "savepoint.save_pretrained": lambda p: savepoint.save_pretrained(model, p),
        "safetensors save_file+fsync": lambda p: _then_fsync(p, safetensors.torch.save_file, state, p),
        "transformers save_pretrained+fsync": lambda p: _then_fsync(p, model.save_pretrained, p),  # type: ignore[arg-type]
        "torch.save+fsync": lambda p: torch_save(p, state),
        "DCP save": lambda p: dcp_save(p, {"model": state}),
        "raw write+fsync": lambda p: raw_write(p, list(state.values())),
        "raw write+fsync, early writeback": lambda p: raw_write(
            p, list(state.values()), early_writeback=True
        ),
    }
    times = alternate(methods, workdir, reps=reps)
    return _throughput_table(f"Save a bf16 model ({size / GB:.2f} GB)", times, size), {
        k: median(v) for k, v in times.items()
    }


def save_train_state(
    model: torch.nn.Module, opt: torch.optim.Optimizer, workdir: str, reps: int
) -> tuple[Table, dict[str, float]]:
    """Model + AdamW state, durable: CheckpointManager.save vs torch.save and DCP."""
    size = sum(t.numel() * t.element_size() for t in flat_tensors([model.state_dict(), opt.state_dict()]))

    def manager_save(path: str) -> None:
        savepoint.CheckpointManager(path).save(1, model=model, optimizer=opt)

    methods: dict[str, Callable[[str], object]] = {
        "savepoint CheckpointManager.save": manager_save,
        "torch.save+fsync": lambda p: torch_save(p, {"model": model.state_dict(), "optim": opt.state_dict()}),
        "DCP save": lambda p: dcp_save(p, {"model": model.state_dict(), "optim": opt.state_dict()}),
        "raw write+fsync": lambda p: raw_write(p, flat_tensors([model.state_dict(), opt.state_dict()])),
        "raw write+fsync, early writeback": lambda p: raw_write(
            p, flat_tensors([model.state_dict(), opt.state_dict()]), early_writeback=True
        ),
    }
    times = alternate(methods, workdir, reps=reps)
    title = f"Save model + AdamW state ({size / GB:.2f} GB, fp32)"
    return _throughput_table(title, times, size), {k: median(v) for k, v in times.items()}


def _throughput_table(title: str, times: dict[str, list[float]], size: int) -> Table:
    raw = median(times["raw write+fsync"])
    rows = [
        {
            "method": name,
            "median s": median(ts),
            "min–max s": spread(ts),
            "GB/s": size / GB / median(ts),
            "× raw time": median(ts) / raw,
            "fraction of raw bandwidth": raw / median(ts),
        }
        for name, ts in times.items()
    ]
    return Table(title, rows)


def async_stall(
    model: torch.nn.Module, opt: torch.optim.Optimizer, workdir: str, reps: int, sync_median: float
) -> tuple[Table, dict[str, float]]:
    """How long save() blocks training with async_save=True, against a sync save of the same state."""
    root = os.path.join(workdir, "async-run")
    mgr = savepoint.CheckpointManager(root, async_save=True, keep_last=1)
    mgr.save(0, model=model, optimizer=opt)  # first save allocates the host buffers; steady state after
    mgr.wait()
    stalls, totals, dcp_stalls, dcp_totals = [], [], [], []
    for rep in range(1, reps + 1):
        with torch.no_grad():
            next(model.parameters()).add_(1.0)  # a training step happened
        start = time.perf_counter()
        mgr.save(rep, model=model, optimizer=opt)
        stalls.append(time.perf_counter() - start)
        mgr.wait()
        totals.append(time.perf_counter() - start)
        os.sync()
        stall, total = _dcp_async(os.path.join(workdir, f"dcp-async-{rep}"), model, opt)
        dcp_stalls.append(stall)
        dcp_totals.append(total)
    mgr.close()
    release_buffers(root)
    remove(root)
    rows = [
        _stall_row("savepoint async save()", stalls, totals, sync_median),
        _stall_row("DCP async_save()", dcp_stalls, dcp_totals, sync_median),
    ]
    notes = [
        f"sync reference: savepoint CheckpointManager.save of the same state, median {sync_median:.2f} s",
        "steady state: the first async save (which allocates the reused host buffers) is not counted",
    ]
    return Table("Async save: time save() blocks the training loop", rows, notes), {
        "stall": median(stalls),
        "dcp_stall": median(dcp_stalls),
    }


def _dcp_async(path: str, model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[float, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        future = dcp.async_save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=path)
        stall = time.perf_counter() - start
        (future.result() if hasattr(future, "result") else future.upload_completion.result())
        total = time.perf_counter() - start
    remove(path)
    os.sync()
    return stall, total


def _stall_row(name: str, stalls: list[float], totals: list[float], sync_median: float) -> dict[str, object]:
    return {
        "method": name,
        "stall median s": median(stalls),
        "stall min–max s": spread(stalls),
        "until durable s": median(totals),
        "stall / sync save": median(stalls) / sync_median,
    }


def dedupe(model: torch.nn.Module, workdir: str, shard: str) -> tuple[Table, dict[str, float]]:
    """Two saves of a model whose first half is frozen: what the second one writes."""
    root = os.path.join(workdir, "dedupe-run")
    names = [n for n, _ in model.named_parameters()]
    trained = names[len(names) // 2 :]
    rows, stats = [], {}
    for step, previous in [(1, None), (2, "step-00000001")]:
        if step == 2:
            with torch.no_grad():
                for n in trained:
                    model.get_parameter(n).add_(1.0)
        os.sync()
        before, start = io_write_bytes(), time.perf_counter()
        staged = DedupingStagedDir(root, f"step-{step:08d}", previous=previous)
        write_model_files(model, staged, max_shard_size=shard)
        staged.commit(build_manifest("model", staged.entries, step=step, parent=previous).to_json())
        seconds, written_io = time.perf_counter() - start, io_write_bytes() - before
        total = sum(size for size, _ in staged.entries.values())
        linked = sum(staged.linked.values())
        stats[f"save{step}_fraction"] = (total - linked) / total
        rows.append(
            {
                "save": f"#{step}" + (" (half the layers changed)" if step == 2 else ""),
                "files": len(staged.entries),
                "linked files": len(staged.linked),
                "logical GB": total / GB,
                "GB written": (total - linked) / GB,
                "written / logical": (total - linked) / total,
                "block-layer GB (/proc/self/io)": written_io / GB if before >= 0 else "n/a",
                "seconds": seconds,
            }
        )
    remove(root)
    notes = [
        f"shards of at most {shard} (huggingface_hub's splitter), so frozen layers sit in shards of their own",
        "savepoint.storage.dedupe.DedupingStagedDir streams each file against the parent's and hard-links it "
        "when every byte matches; the manager gets it through the staged dir of pipeline.save.write_checkpoint",
    ]
    return Table("Dedupe: second save of a half-frozen model", rows, notes), stats
