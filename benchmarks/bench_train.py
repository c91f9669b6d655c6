"""Training throughput while an async save is being written in the background."""

from __future__ import annotations

import functools
import os
import time

import torch

from benchmarks.common import Table, median, remove
from savepoint.pipeline.job import SaveRequest
from savepoint.pipeline.save import capture, write_checkpoint
from savepoint.snapshot import BackgroundWriter, release_buffers


def slowdown(
    loop_model: torch.nn.Module, model: torch.nn.Module, opt: torch.optim.Optimizer, workdir: str, reps: int
) -> tuple[Table, dict[str, float]]:
    """Steps/s of a small training loop with and without a save of the big state in flight."""
    loop_opt = torch.optim.AdamW(loop_model.parameters(), lr=1e-4)
    vocab = int(loop_model.config.vocab_size)  # type: ignore[union-attr, arg-type]
    ids = torch.randint(0, vocab, (4, 128), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        loop_model(input_ids=ids, labels=ids).loss.backward()
        loop_opt.step()
        loop_opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()  # warm-up: allocations, optimizer state
    writer = BackgroundWriter(name="bench-writer")
    free, busy, writer_cpu, writer_wall = [], [], [], []
    for rep in range(reps):
        root = os.path.join(workdir, f"slowdown-{rep}")
        job = capture(SaveRequest(root=root, step=rep + 1, model=model, optimizer=opt), snapshot=True)
        cpu: list[float] = []
        writer.submit(functools.partial(_timed_write, job, cpu))
        start, steps = time.perf_counter(), 0
        while writer.busy:
            step()
            steps += 1
        wall = time.perf_counter() - start
        writer.wait()
        busy.append(steps / wall)
        writer_cpu.append(cpu[0])
        writer_wall.append(cpu[1])
        remove(root)
        os.sync()
        start, steps = time.perf_counter(), 0
        while time.perf_counter() - start < wall:
            step()
            steps += 1
        free.append(steps / (time.perf_counter() - start))
        release_buffers(root)
    rows = [
        {"training loop": "no save in flight", "steps/s (median)": median(free)},
        {
            "training loop": "async save in flight",
            "steps/s (median)": median(busy),
            "relative": median(busy) / median(free),
        },
    ]
    notes = [
        f"writer thread: {median(writer_cpu):.2f} s CPU over {median(writer_wall):.2f} s wall per save "
        f"({median(writer_cpu) / median(writer_wall):.0%} of one core: hashing and copying into the page cache)",
        f"torch intra-op threads: {torch.get_num_threads()} on {os.cpu_count()} cores. What limits it: the writer "
        "thread and the kernel's writeback threads take CPU from torch's intra-op threads, and a parallel op "
        "waits for its slowest thread, so a save that needs part of one core can stall whole ops; memory "
        "bandwidth is shared with the page-cache copies too. With a GPU doing the math the loop is far less "
        "exposed (its CPU threads mostly launch kernels).",
    ]
    return Table("Training steps/s while a background save is written", rows, notes), {
        "relative": median(busy) / median(free)
    }


def _timed_write(job: object, out: list[float]) -> None:
    cpu, wall = time.thread_time(), time.perf_counter()
    write_checkpoint(job)  # type: ignore[arg-type]
    out.extend([time.thread_time() - cpu, time.perf_counter() - wall])
