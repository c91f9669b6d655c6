"""End to end: what checkpointing every N steps adds to an AdamW training loop, per save method.

    python -m benchmarks.bench_async_loop [--quick] [--reps N] [--workdir DIR]

Each run trains `steps` steps of an MLP with AdamW and saves at steps 5, 15, 25, ... (so every save
has training after it to hide behind), then waits until the last save is durable: the run's wall
time is what a job pays. Variants, alternated run by run (rotating order) so a noisy disk or a busy
machine hits them alike; medians over repetitions:
none / savepoint sync / savepoint async thread (async_save=True) / savepoint async process
(async_save="process") / DCP async_save, thread and process modes (1-rank gloo group).
Every method keeps its writer (thread pool, process) across runs; one warm-up run each is not timed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

import savepoint
from benchmarks.common import GB, Table, median, remove, spread

FULL = {"width": 1536, "layers": 4, "batch": 64, "steps": 20, "every": 10}  # 9.4M params, 0.11 GB state
PRIORITY_ENV = "SAVEPOINT_WRITER_PRIORITY"
QUICK = {"width": 256, "layers": 2, "batch": 8, "steps": 10, "every": 5}


@dataclass
class Run:
    wall: float = 0.0
    cpu: float = 0.0  # CPU seconds of the training process (all its threads; not a writer process)
    writer_cpu: float = 0.0  # CPU seconds of savepoint's writer process (async_save="process")
    saves: int = 0
    save_calls: list[float] = field(default_factory=list)  # how long each save() blocked
    busy_steps: list[float] = field(default_factory=list)  # durations of steps taken with a save in flight
    free_steps: list[float] = field(default_factory=list)
    final_wait: float = 0.0  # after the last step, until the last save was durable

    def in_run_cost(self) -> float:
        """What the saves cost this run, from its own steps: the save() calls, each step taken with a
        save in flight minus this run's median free step, and the final wait. Paired within one run, so
        other jobs' load from run to run cancels more than in (wall − the 'no checkpoint' run's wall)."""
        free = median(self.free_steps) if self.free_steps else 0.0
        return sum(self.save_calls) + sum(t - free for t in self.busy_steps) + self.final_wait


class Method:
    """A save method: `save(step)` starts a save; `busy()` says one is in flight; `wait()` ends it."""

    def __init__(self, name: str) -> None:
        self.name = name

    def save(self, step: int) -> None: ...

    def busy(self) -> bool:
        return False

    def wait(self) -> None: ...

    def reset(self) -> None:
        """Between runs, untimed: drop what the run wrote."""

    def snapshot_bytes(self) -> int | None:
        return None

    def writer_pid(self) -> int | None:
        return None

    def close(self) -> None: ...


class Savepoint(Method):
    def __init__(
        self,
        name: str,
        root: str,
        model: torch.nn.Module,
        opt: torch.optim.Optimizer,
        mode: Any,
        priority: str | None = None,
    ) -> None:
        super().__init__(name)
        self.root, self.model, self.opt, self.mode = root, model, opt, mode
        self.priority = priority  # the writer's SAVEPOINT_WRITER_PRIORITY (None: the default)
        with self._priority():  # the writer process takes its policy when it starts
            self.mgr = savepoint.CheckpointManager(root, async_save=mode)

    def save(self, step: int) -> None:
        with self._priority():  # a thread writer takes its policy when its thread starts
            self.mgr.save(step, model=self.model, optimizer=self.opt)

    @contextlib.contextmanager
    def _priority(self) -> Iterator[None]:
        before = os.environ.get(PRIORITY_ENV)
        if self.priority is not None:
            os.environ[PRIORITY_ENV] = self.priority
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(PRIORITY_ENV, None)
            else:
                os.environ[PRIORITY_ENV] = before

    def busy(self) -> bool:
        writer = self.mgr._writer
        return bool(writer is not None and writer.busy)

    def wait(self) -> None:
        self.mgr.wait()

    def reset(self) -> None:
        for info in self.mgr.checkpoints:
            remove(info.path)

    def writer_pid(self) -> int | None:
        return int(self.mgr._writer.pid) if self.mode == "process" else None

    def snapshot_bytes(self) -> int | None:
        return int(self.mgr._writer.snapshot_bytes) if self.mode else None

    def close(self) -> None:
        self.mgr.close()


class DCPAsync(Method):
    def __init__(
        self, name: str, root: str, model: torch.nn.Module, opt: torch.optim.Optimizer, kind: Any
    ) -> None:
        super().__init__(name)
        self.root, self.model, self.opt, self.kind = root, model, opt, kind
        self.future: Any = None

    def save(self, step: int) -> None:
        self.wait()
        state = {"model": self.model.state_dict(), "optim": self.opt.state_dict()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.future = dcp.async_save(
                state,
                checkpoint_id=os.path.join(self.root, f"step-{step}"),
                async_checkpointer_type=self.kind,
            )

    def busy(self) -> bool:
        return self.future is not None and not _future(self.future).done()

    def wait(self) -> None:
        if self.future is not None:
            _future(self.future).result()
            self.future = None

    def reset(self) -> None:
        remove(self.root)


def _future(f: Any) -> Any:
    return f.upload_completion if hasattr(f, "upload_completion") else f


def make_model(size: dict[str, int]) -> tuple[torch.nn.Module, torch.optim.Optimizer, Callable[[], None]]:
    torch.manual_seed(0)
    width, layers = size["width"], size["layers"]
    model = torch.nn.Sequential(
        *[m for _ in range(layers) for m in (torch.nn.Linear(width, width), torch.nn.GELU())]
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(size["batch"], width)

    def step() -> None:
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # AdamW's state exists from here on
    return model, opt, step


def one_run(method: Method | None, step_fn: Callable[[], None], size: dict[str, int], first: int) -> Run:
    run = Run()
    pid = method.writer_pid() if method is not None else None
    writer_cpu = _proc_cpu(pid) if pid else 0.0
    cpu = _cpu()
    start = time.perf_counter()
    for i in range(1, size["steps"] + 1):
        t0 = time.perf_counter()
        in_flight = method is not None and method.busy()
        step_fn()
        (run.busy_steps if in_flight else run.free_steps).append(time.perf_counter() - t0)
        if method is not None and i % size["every"] == size["every"] // 2:
            t0 = time.perf_counter()
            method.save(first + i)
            run.save_calls.append(time.perf_counter() - t0)
            run.saves += 1
    if method is not None:
        t0 = time.perf_counter()
        method.wait()
        run.final_wait = time.perf_counter() - t0
    run.wall = time.perf_counter() - start
    run.cpu = _cpu() - cpu
    run.writer_cpu = _proc_cpu(pid) - writer_cpu if pid else 0.0
    return run


def _proc_cpu(pid: int) -> float:
    """CPU seconds of another process (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def memcpy_floor(
    model: torch.nn.Module, opt: torch.optim.Optimizer, reps: int = 5
) -> tuple[float, int, float]:
    """(seconds, bytes, CPU seconds of this process) to copy the whole training state into buffers
    allocated once: the floor of any snapshot."""
    tensors = list(model.state_dict().values()) + [
        t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.dim() > 0
    ]
    buffers = [torch.empty_like(t) for t in tensors]
    times, cpus = [], []
    for _ in range(reps + 1):  # the first one faults the buffers in
        start, cpu = time.perf_counter(), _cpu()
        for b, t in zip(buffers, tensors, strict=True):
            b.copy_(t)
        times.append(time.perf_counter() - start)
        cpus.append(_cpu() - cpu)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    return median(times[1:] or times), nbytes, median(cpus[1:] or cpus)


def run(
    workdir: str,
    *,
    quick: bool = False,
    reps: int = 0,
    size: dict[str, int] | None = None,
    only: tuple[str, ...] = (),
    priorities: tuple[str, ...] = (),
) -> tuple[list[dict[str, object]], list[str]]:
    """`only`: run just the methods whose names contain one of these (plus 'no checkpoint' and the
    sync save, the references); `priorities`: one async method per writer priority policy
    (io/priority.py), side by side; empty means the default policy only."""
    size = size or (QUICK if quick else FULL)
    reps = reps or (1 if quick else 5)
    load_before = os.getloadavg()[0]
    model, opt, step_fn = make_model(size)
    own_group = not dist.is_initialized()
    if own_group:  # DCP's async_save wants a process group: one rank, gloo
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    methods: dict[str, Method | None] = {"no checkpoint": None}
    try:
        methods["savepoint sync"] = Savepoint("sync", os.path.join(workdir, "sync"), model, opt, False)
        for mode, label in ((True, "thread"), ("process", "process")):
            for priority in priorities or (None,):
                name = f"savepoint async {label}" + (f" ({priority})" if priority else "")
                if _wanted(name, only):
                    root = os.path.join(workdir, f"{label}-{priority or 'default'}")
                    methods[name] = Savepoint(label, root, model, opt, mode, priority)
        for kind in AsyncCheckpointerType:
            name = f"DCP async_save {kind.value}"
            if _wanted(name, only):
                methods[name] = DCPAsync(
                    kind.value, os.path.join(workdir, f"dcp-{kind.value}"), model, opt, kind
                )
        runs: dict[str, list[Run]] = {name: [] for name in methods}
        names = list(methods)
        first = 0
        floors: list[float] = []
        cpu_floors: list[float] = []
        state_bytes = memcpy_floor(model, opt, reps=0)[1]
        for rep in range(reps + 1):  # rep 0 warms every method up (writer start, imports, buffers)
            for name in names[rep % len(names) :] + names[: rep % len(names)]:
                method = methods[name]
                result = one_run(method, step_fn, size, first)
                print(
                    f"[bench_async_loop] rep {rep} {name}: {result.wall:.2f} s", file=sys.stderr, flush=True
                )
                first += 1000
                if rep:
                    runs[name].append(result)
                if method is not None:
                    method.reset()
                os.sync()
            floor, _, cpu_floor = memcpy_floor(model, opt)  # under the same load as this repetition
            floors.append(floor)
            cpu_floors.append(cpu_floor)
        rows = _rows(runs, methods, median(floors), median(cpu_floors))
    finally:
        for method in methods.values():
            if method is not None:
                method.close()
        if own_group:
            dist.destroy_process_group()
    params = sum(p.numel() for p in model.parameters())
    notes = [
        f"model: MLP {size['layers']}×Linear({size['width']}, {size['width']}), {params / 1e6:.1f}M parameters, "
        f"AdamW; state {state_bytes / GB:.2f} GB (fp32 weights + 2 moments). The issue's loop is 100M parameters "
        "and 1.2 GB; scaled down ~10× so "
        "`make bench` stays short on 2 shared cores",
        f"{size['steps']} steps per run, a save at steps {size['every'] // 2}, {size['every'] + size['every'] // 2}, "
        f"...; wall time until the last save is durable; {reps} runs per method, alternated, medians",
        f"added = median over rounds of (wall − wall of that round's 'no checkpoint' run); memcpy floor = "
        f"{median(floors) * 1e3:.0f} ms to copy the state into buffers allocated once (what any snapshot must pay), "
        "measured once per round",
        "save() blocks: median time one save() call kept the loop waiting; trainer CPU added: CPU time of the "
        "training process (all its threads, a writer process's not) over the run, minus 'no checkpoint'; "
        "save CPU per save: that plus savepoint's writer process's CPU, per save, against the CPU of the "
        f"memcpy ({median(cpu_floors) * 1e3:.0f} ms; DCP's process-mode writer is not counted): the "
        "measure least moved by other jobs on a shared machine",
        "in-run per save: each run's own estimate (its save() calls, plus each step taken with a save in "
        "flight minus that run's median free step, plus the wait for the last save after the last step), "
        "median over runs, per save, against the memcpy: less exposed to other jobs than 'added'",
        "steps/s in flight: steps started while that method's save was still being written, against the "
        "steps/s of 'no checkpoint'",
        "snapshot memory: host buffers savepoint keeps for snapshots (shared memory for the process "
        "writer), reused from save to save; DCP's staging copies are not counted here",
        "CUDA (pinned snapshot, non-blocking copies): unmeasured, no GPU in this run",
        f"load average (1 min): {load_before:.1f} before the run, {os.getloadavg()[0]:.1f} after",
        "command: python -m benchmarks.bench_async_loop"
        + (" --quick" if quick else "")
        + "".join(f" --{k} {v}" for k, v in size.items() if v != FULL[k] and not quick)
        + (f" --only {','.join(only)}" if only else "")
        + (f" --priorities {','.join(priorities)}" if priorities else ""),
    ]
    return rows, notes


def _rows(
    runs: dict[str, list[Run]], methods: dict[str, Method | None], floor: float, cpu_floor: float
) -> list[dict[str, object]]:
    """Added time is paired by repetition (each run minus the 'no checkpoint' run of the same round),
    which cancels most of a shared machine's drift from round to round; then the median is taken."""
    none = runs["no checkpoint"]
    base_rate = 1 / median([t for r in none for t in r.free_steps])

    def added(results: list[Run], what: str) -> float:
        return median([getattr(r, what) - getattr(b, what) for r, b in zip(results, none, strict=True)])

    sync_added = added(runs["savepoint sync"], "wall")
    rows: list[dict[str, object]] = []
    for name, results in runs.items():
        walls = [r.wall for r in results]
        saves = max(1, results[0].saves)
        busy = [t for r in results for t in r.busy_steps]
        calls = [t for r in results for t in r.save_calls]
        method = methods[name]
        snap = method.snapshot_bytes() if method is not None else None
        row: dict[str, object] = {"method": name, "wall s (median)": median(walls), "min–max": spread(walls)}
        if method is not None:
            wall_added = added(results, "wall")
            row |= {
                "added s": wall_added,
                "added / sync's added": wall_added / sync_added,
                "per save s": wall_added / saves,
                "per save / memcpy": wall_added / saves / floor,
                "in-run per save / memcpy": median([r.in_run_cost() for r in results]) / saves / floor,
                "save() blocks s": median(calls),
                "save() / memcpy": median(calls) / floor,
                "trainer CPU added s": added(results, "cpu"),
                "save CPU per save / memcpy CPU": (
                    added(results, "cpu") + median([r.writer_cpu for r in results])
                )
                / saves
                / cpu_floor,
                "steps/s in flight / none": (1 / median(busy)) / base_rate if busy else "",
                "snapshot GB": snap / GB if snap else "",
            }
        rows.append(row)
    return rows


def _wanted(name: str, only: tuple[str, ...]) -> bool:
    return not only or any(part in name for part in only)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_async_loop", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=0)
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    parser.add_argument("--only", default="", help="comma-separated parts of method names to run")
    parser.add_argument(
        "--priorities",
        default="",
        help="comma-separated writer priority policies to compare: idle,nice,normal",
    )
    for key, value in FULL.items():  # the issue's own loop: --width 4096 --layers 6 (100M parameters)
        parser.add_argument(f"--{key}", type=int, default=value)
    args = parser.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="savepoint-bench-loop-", dir=args.workdir)
    size = None if args.quick else {key: getattr(args, key) for key in FULL}
    try:
        rows, notes = run(
            workdir,
            quick=args.quick,
            reps=args.reps,
            size=size,
            only=tuple(p for p in args.only.split(",") if p),
            priorities=tuple(p for p in args.priorities.split(",") if p),
        )
    finally:
        remove(workdir)
    print(Table(TITLE, rows, notes).markdown())
    return 0


TITLE = "Async saves end to end: an AdamW loop saving every N steps"

if __name__ == "__main__":
    raise SystemExit(main())
