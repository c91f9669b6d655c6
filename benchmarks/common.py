"""Timing and disk helpers shared by the benchmarks: alternating repetitions, fsync, cache drops."""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import time
from collections.abc import Callable, Iterator

GB = 1e9


def fsync_tree(path: str) -> None:
    """fsync every file under `path` (or the file itself), so a library's save is timed as durable."""
    paths = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.unlink(path)


def drop_caches() -> bool:
    """Empty the page cache (root only), so the next read comes from the disk. False if not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def io_write_bytes() -> int:
    """Bytes this process caused to be sent to storage (Linux /proc/self/io), or -1 where unavailable."""
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("write_bytes"))
    except (OSError, StopIteration):
        return -1


@contextlib.contextmanager
def stopwatch() -> Iterator[list[float]]:
    box: list[float] = []
    start = time.perf_counter()
    try:
        yield box
    finally:
        box.append(time.perf_counter() - start)


def alternate(
    methods: dict[str, Callable[[str], object]],
    workdir: str,
    *,
    reps: int,
    before: Callable[[], object] | None = None,
) -> dict[str, list[float]]:
    """Time each method `reps` times, interleaved (A B C, B C A, ...) so drift in a noisy disk or a
    busy machine hits every method alike. Each call gets a fresh output path, removed afterwards."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for rep in range(reps):
        # Rotate the order too, so no method always runs right after the same neighbour's deletion.
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            fn = methods[name]
            out = os.path.join(workdir, f"{name.replace(' ', '_').replace('/', '_')}-{rep}")
            if before is not None:
                before()
            start = time.perf_counter()
            fn(out)
            times[name].append(time.perf_counter() - start)
            remove(out)
            os.sync()  # deletions and their discards land now, not in the next method's timing
    return times


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float]) -> str:
    """min–max of the repetitions, for the tables."""
    return f"{min(values):.2f}–{max(values):.2f}" if values else "n/a"


class Table:
    """One results table: rows of {column: value}, plus notes printed under it."""

    def __init__(
        self, title: str, rows: list[dict[str, object]] | None = None, notes: list[str] | None = None
    ) -> None:
        self.title = title
        self.rows = rows or []
        self.notes = notes or []

    def markdown(self) -> str:
        if not self.rows:
            return f"### {self.title}\n\n" + "".join(f"- {n}\n" for n in self.notes or ["(no rows)"])
        cols = list(dict.fromkeys(c for r in self.rows for c in r))
        lines = [f"### {self.title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_cell(r.get(c, "")) for c in cols) + " |" for r in self.rows]
        lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def _cell(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
