"""Where an async save's writer spends CPU, per save and per phase, against a memcpy of the state.

    python -m benchmarks.bench_writer_cpu [--width 1536 --layers 4] [--reps 5] [--workdir DIR]

CPU seconds, not wall time, so other jobs on a shared machine barely move the numbers. One process,
`torch.set_num_threads(1)`, nothing training while a save is written: the process's CPU between
`save()` and `wait()`, minus the main thread's own, is the writer thread's (async_save=True); the
writer process's CPU comes from /proc/PID/stat (async_save="process"). Phases are exclusive CPU times
of the writer's functions, taken with `time.thread_time()` on whichever thread ran them (the
safetensors writer's helper thread included):

    hash        xxh3 `update` calls               write       file writes (kernel copy or O_DIRECT)
    writeback   sync_file_range kicks             dedupe      comparing with the parent checkpoint
    fsync       fsync of files, manifest, dirs    commit      manifest and rename, less its fsyncs
    retention   deleting old checkpoints           other       the rest: headers, queues, Python
memcpy = one thread's CPU to copy the same state into buffers allocated once.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

import savepoint
import savepoint.pipeline.save as pipeline_save
import savepoint.storage.dedupe as dedupe
import savepoint.storage.local as local
import savepoint.writer_process as writer_process
from benchmarks.common import GB, Table, median, remove

PHASES = ("hash", "write", "writeback", "dedupe", "fsync", "commit", "retention")


class Phases:
    """Exclusive CPU time per phase, summed over threads (a child phase is not counted in its parent)."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = defaultdict(float)
        self._local = threading.local()
        self._lock = threading.Lock()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        stack = self._local.__dict__.setdefault("stack", [])
        start = time.thread_time()
        stack.append(0.0)
        try:
            yield
        finally:
            spent = time.thread_time() - start
            children = stack.pop()
            if stack:
                stack[-1] += spent
            with self._lock:
                self.cpu[name] += spent - children

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name):
                return fn(*args, **kwargs)

        return timed

    def take(self) -> dict[str, float]:
        out, self.cpu = dict(self.cpu), defaultdict(float)
        return out


class _TimedHasher:
    def __init__(self, inner: Any, phases: Phases) -> None:
        self._inner, self._phases = inner, phases

    def update(self, data: Any) -> None:
        with self._phases.phase("hash"):
            self._inner.update(data)

    def hexdigest(self) -> str:
        return str(self._inner.hexdigest())


def instrument(phases: Phases) -> Callable[[], None]:
    """Wrap the write path's functions (this process only) so each phase's CPU is summed; returns
    the function that puts the originals back."""
    saved: list[tuple[Any, str, Any]] = []

    def wrap(owner: Any, attr: str, name: str) -> None:
        original = getattr(owner, attr)
        saved.append((owner, attr, original))
        setattr(owner, attr, phases.wrap(name, original))

    for module in (local, dedupe):
        inner_new = module.new_hasher
        saved.append((module, "new_hasher", inner_new))
        module.new_hasher = lambda inner_new=inner_new: _TimedHasher(inner_new(), phases)  # type: ignore[assignment]
        wrap(module, "start_writeback", "writeback")
    # Everything a writer's write() does besides hashing and the writeback kick is the file write.
    for cls in (local.HashingWriter, dedupe.DedupeWriter):
        wrap(cls, "write", "write")
    for attr in ("_matches", "_diverge", "finish"):
        wrap(dedupe.DedupeWriter, attr, "dedupe")
    wrap(os, "fsync", "fsync")
    wrap(os, "fdatasync", "fsync")
    wrap(pipeline_save, "commit", "commit")
    wrap(dedupe.DedupingStagedDir, "commit", "commit")  # the recorded plan's commit (writer_process.py)
    wrap(savepoint.CheckpointManager, "_apply_retention", "retention")
    wrap(writer_process, "apply_retention", "retention")

    def undo() -> None:
        for owner, attr, original in reversed(saved):
            setattr(owner, attr, original)

    return undo


def make_state(width: int, layers: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, Callable[[], None]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(8, width)

    def step() -> None:
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    return model, opt, step


def memcpy_cpu(model: torch.nn.Module, opt: torch.optim.Optimizer, reps: int) -> tuple[float, int]:
    tensors = list(model.state_dict().values()) + [
        t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.dim() > 0
    ]
    buffers = [torch.empty_like(t) for t in tensors]
    times = []
    for _ in range(reps + 1):
        start = time.thread_time()
        for b, t in zip(buffers, tensors, strict=True):
            b.copy_(t)
        times.append(time.thread_time() - start)
    return median(times[1:]), sum(t.numel() * t.element_size() for t in tensors)


def _proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(mode: Any, root: str, reps: int, phases: Phases, width: int, layers: int) -> dict[str, Any]:
    model, opt, step = make_state(width, layers)
    mgr = savepoint.CheckpointManager(root, async_save=mode, keep_last=2)
    rows: list[dict[str, float]] = []
    try:
        for i in range(reps + 1):  # the first save has no parent and warms the writer up
            step()
            phases.take()
            pid = mgr._writer.pid if mode == "process" else None
            child0 = _proc_cpu(pid) if pid else 0.0
            cpu0, wall0 = _self_cpu(), time.perf_counter()
            mgr.save(1000 + i, model=model, optimizer=opt)
            trainer_save = _self_cpu() - cpu0  # the safetensors helper thread's copies too
            main_saved = time.thread_time()
            mgr.wait()
            wall = time.perf_counter() - wall0
            main_waiting = time.thread_time() - main_saved
            # The writer thread's: all of the process's CPU but save()'s (on whichever thread) and wait()'s.
            writer = (_proc_cpu(pid) - child0) if pid else (_self_cpu() - cpu0 - trainer_save - main_waiting)
            got = phases.take()
            if i == 0:
                continue
            row = {"wall": wall, "trainer save()": trainer_save, "writer": writer}
            if pid is None:
                for name in PHASES:
                    row[name] = got.get(name, 0.0)
                row["other"] = writer - sum(row[n] for n in PHASES)
            rows.append(row)
    finally:
        mgr.close()
    return {k: median([r[k] for r in rows]) for k in rows[0]}


def run(
    workdir: str, *, width: int, layers: int, reps: int, modes: tuple[str, ...] = ("thread", "process")
) -> tuple[list[dict[str, object]], list[str]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    phases = Phases()
    undo = instrument(phases)
    try:
        model, opt, _ = make_state(width, layers)
        floor, nbytes = memcpy_cpu(model, opt, reps=5)
        del model, opt
        results = {}
        for label, mode in (("thread", True), ("process", "process")):
            if label not in modes:
                continue
            root = os.path.join(workdir, label)
            results[label] = measure(mode, root, reps, phases, width, layers)
            remove(root)
    finally:
        undo()
        torch.set_num_threads(threads)
    rows: list[dict[str, object]] = []
    for key in ("trainer save()", "writer", *PHASES, "other", "wall"):
        row: dict[str, object] = {"CPU s per save": key}
        for label, result in results.items():
            if key in result:
                row[label] = result[key]
                row[f"{label} / memcpy"] = result[key] / floor
        rows.append(row)
    notes = [
        f"state: {layers}×Linear({width}, {width}) + AdamW, {nbytes / GB:.3f} GB; memcpy (one thread's CPU "
        f"to copy it into buffers allocated once) = {floor * 1e3:.1f} ms",
        f"medians of {reps} saves, each with a parent checkpoint (dedupe compares, nothing links); "
        "torch.set_num_threads(1); nothing trains while the writer runs",
        "trainer save(): the training process's CPU in save() (the snapshot: the copy into the writer's "
        "arena, shared memory for the process writer); writer: the writer thread's (process's) CPU; "
        "wall: save() to durable. Phases: writer thread only (the writer process's total is measured, "
        "not split)",
        "kernel flusher threads' CPU (buffered writes) is not in any row",
        f"command: python -m benchmarks.bench_writer_cpu --width {width} --layers {layers} --reps {reps}",
    ]
    return rows, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_writer_cpu", description=__doc__)
    parser.add_argument("--width", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    parser.add_argument("--modes", default="thread,process", help="comma-separated: thread, process")
    args = parser.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="savepoint-bench-writer-", dir=args.workdir)
    load = os.getloadavg()[0]
    try:
        modes = tuple(args.modes.split(","))
        rows, notes = run(workdir, width=args.width, layers=args.layers, reps=args.reps, modes=modes)
    finally:
        remove(workdir)
    notes.append(f"load average: {load:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(Table(TITLE, rows, notes).markdown())
    return 0


TITLE = "Async writers: CPU per save, by phase"


if __name__ == "__main__":
    raise SystemExit(main())
