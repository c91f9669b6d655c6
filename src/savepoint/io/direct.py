"""Direct I/O (O_DIRECT): bytes move between the disk and our own memory, with no page cache between.

Why: a buffered write() copies every byte into the page cache in the kernel and writes it back from
there later; a buffered read fills page-cache pages first. On our 2-core VM that copy cost ~3x a
memcpy of the state per async save (BENCHMARKS.md, "Writer CPU per save"), and since the VM hands
freed memory back to the host, every new page-cache page also costs a fault on the host: a 3 GiB
write plus fsync took 3 to 16 s buffered and about 2 s direct. Used by the async writers (inside
`direct_writes()`), by streamed outputs such as merged shards (`StagedDir.create(direct=True)`), and
by the merge's reads of large base tensors (`reopen_direct`). Everything falls back to plain I/O
where the file system refuses O_DIRECT (tmpfs, some network file systems).

O_DIRECT asks for aligned offsets, lengths and addresses, which a safetensors file does not have
(its header is any multiple of 8 bytes long), so `DirectFile` writes whole aligned blocks: straight
from the caller's memory where the caller's bytes line up with the file's blocks (the process
writer's shared arena lays them out so), through an aligned bounce buffer otherwise; the last
partial block is written padded and the file truncated to its exact size. The bytes on disk are
exactly what a buffered write would have left. `OverlappedWriter` puts two large aligned buffers in
front of it, one written on a thread while the other fills, to keep the disk's queue deep while a
merge computes the next tensors.

    with direct_writes():               # async writers only; a synchronous save writes buffered
        f = open_for_write(path)        # a DirectFile, or a plain binary file where O_DIRECT is refused
        f.write(view); f.flush(); os.fsync(f.fileno()); f.close()
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextvars import ContextVar
from typing import Any, BinaryIO

import numpy as np
import torch

ALIGN = 4096  # a page: satisfies every logical block size in use (512 and 4096)
_BOUNCE = 8 << 20
MIN_DIRECT_BYTES = 8 << 20  # smaller reads are not worth a second descriptor and an aligned window
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_MAX_WRITE = 1 << 30  # Linux writes at most ~2 GiB per call

_ENABLED: ContextVar[bool] = ContextVar("savepoint_direct_writes", default=False)


@contextlib.contextmanager
def direct_writes() -> Iterator[None]:
    """Files opened with `open_for_write` in this context (thread) bypass the page cache."""
    token = _ENABLED.set(True)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def enabled() -> bool:
    return _ENABLED.get() and hasattr(os, "O_DIRECT")


def open_for_write(path: str, *, direct: bool = False) -> DirectFile | BinaryIO:
    """A new file at `path`, truncated: a DirectFile when `direct` or inside `direct_writes()`, else a
    buffered file."""
    if not (enabled() or (direct and _O_DIRECT)):
        return open(path, "wb")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    return DirectFile(fd)


def reopen_direct(fd: int, flags: int) -> int | None:
    """A second descriptor for the file open at `fd`, with O_DIRECT; None where that is refused.

    Reopened through /proc/self/fd, so it is the very file already opened (no path is looked up again:
    the checks made when `fd` was opened still hold)."""
    if not _O_DIRECT or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        return os.open(f"/proc/self/fd/{fd}", flags | _O_DIRECT | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None


def aligned_window(start: int, end: int) -> tuple[int, int]:
    """The smallest [lo, hi) around [start, end) whose ends are multiples of ALIGN."""
    return start - start % ALIGN, -(-end // ALIGN) * ALIGN


def aligned_part(buf: torch.Tensor, nbytes: int) -> torch.Tensor:
    """The first `nbytes` of uint8 `buf` that start on an ALIGN boundary (`buf` has ALIGN bytes spare)."""
    pad = -buf.data_ptr() % ALIGN
    return buf[pad : pad + nbytes]


def address(view: memoryview) -> int:
    """The address of a byte view's first byte (read-only views too)."""
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data) if view.nbytes else 0


class DirectFile:
    """Appends bytes to an open file in aligned blocks with O_DIRECT (buffered where it is refused).

    `start`: bytes already in the file (the next write goes there); only its last partial block is
    rewritten. `flush()` writes the pending tail and truncates to the exact size; it may be called
    again after more writes."""

    direct = True

    def __init__(self, fd: int, *, start: int = 0) -> None:
        self._fd = fd
        self.size = start
        self._flushed = start - start % ALIGN  # the file offset of the bounce buffer's first byte
        self._bounce = mmap.mmap(-1, _BOUNCE)  # anonymous: page-aligned
        self._bounce_view = memoryview(self._bounce)
        self._bounce_at = address(self._bounce_view)
        self._fill = start % ALIGN
        if self._fill:  # the partial block already on disk goes out again with what follows it
            got = os.pread(fd, self._fill, self._flushed)
            self._bounce_view[: len(got)] = got
        self.direct = _set_direct(fd, True)

    def fileno(self) -> int:
        return self._fd

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        n, i = view.nbytes, 0
        base = address(view)
        while i < n:
            fill = self._fill
            if fill % ALIGN == 0 and n - i >= ALIGN and (base + i) % ALIGN == 0:
                self._drain()  # aligned on both sides: the disk reads the caller's memory
                k = (n - i) // ALIGN * ALIGN
                self._pwrite(view[i : i + k], self._flushed)
                self._flushed += k
                i += k
                continue
            head = -fill % ALIGN
            if head and n - i >= head + ALIGN and (base + i + head) % ALIGN == 0:
                k = head  # complete the block; the rest lines up and goes direct
            else:
                k = min(n - i, _BOUNCE - fill)
            ctypes.memmove(self._bounce_at + fill, base + i, k)  # releases the GIL
            self._fill += k
            i += k
            if self._fill == _BOUNCE:
                self._drain()
        self.size += n
        return n

    def flush(self) -> None:
        """Write the pending bytes (the last block padded) and cut the file to its exact size."""
        if self._fill:
            padded = -(-self._fill // ALIGN) * ALIGN
            self._pwrite(self._bounce_view[:padded], self._flushed)
        os.ftruncate(self._fd, self.size)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._bounce_view.release()
        self._bounce.close()

    def __enter__(self) -> DirectFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _drain(self) -> None:
        if self._fill:
            self._pwrite(self._bounce_view[: self._fill], self._flushed)
            self._flushed += self._fill
            self._fill = 0

    def _pwrite(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < view.nbytes:
            piece = view[done : done + _MAX_WRITE]
            try:
                n = os.pwrite(self._fd, piece, offset + done)
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self.direct:
                    raise
                # This file system wants another alignment: the same writes, through the page cache.
                self.direct = _set_direct(self._fd, False)
                continue
            if n == 0:
                raise OSError(errno.EIO, "the file system accepted no bytes")
            done += n


class OverlappedWriter:
    """Two aligned buffers in front of a `DirectFile`: writes fill one while the other is written on a
    thread, so the disk works while the caller computes. `finish()` writes the rest; `close()` after it,
    or after a failure. Where the file is not direct, writes go straight through."""

    def __init__(self, file: DirectFile | BinaryIO, buffer_bytes: int = 64 << 20) -> None:
        """`buffer_bytes`: each hand-off is one whole buffer; 64 MiB keeps the disk's queue deep
        (8 MiB wrote 3.2 GB in 3.8 to 4.8 s, 64 MiB in 2.6 to 2.7 s)."""
        self._file = file
        self._views: list[memoryview] = []
        if isinstance(file, DirectFile) and file.direct:
            for _ in range(2):
                array: Any = aligned_part(torch.empty(buffer_bytes + ALIGN, dtype=torch.uint8), buffer_bytes)
                self._views.append(memoryview(array.numpy()))
        self.direct = bool(self._views)  # no dirty pages to start writeback on (HashingWriter asks)
        self._filled = 0  # bytes waiting in the current buffer (self._views[0])
        self._io: ThreadPoolExecutor | None = None
        self._in_flight: Future[int] | None = None  # the write of self._views[1]

    def write(self, data: bytes | bytearray | memoryview, /) -> int:
        if not self._views:
            return self._file.write(data)
        src = memoryview(data).cast("B")
        done = 0
        while done < src.nbytes:
            view = self._views[0]
            n = min(src.nbytes - done, view.nbytes - self._filled)
            view[self._filled : self._filled + n] = src[done : done + n]
            self._filled += n
            done += n
            if self._filled == view.nbytes:
                self._hand_off()
        return src.nbytes

    def _hand_off(self) -> None:
        """Start writing the full current buffer on the I/O thread and continue in the other one."""
        self._wait()
        if self._io is None:
            self._io = ThreadPoolExecutor(1, thread_name_prefix="savepoint-direct-write")
        self._in_flight = self._io.submit(self._file.write, self._views[0])
        self._views.reverse()
        self._filled = 0

    def _wait(self) -> None:
        """Wait for the write in flight; its error (a full disk, say) is raised here."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.result()

    def flush(self) -> None:
        """Nothing to do: bytes short of a whole buffer wait for `finish()`."""

    def fileno(self) -> int:
        return self._file.fileno()

    def finish(self) -> None:
        """Write what is left (the file's `flush()` then pads the last block and trims the file)."""
        self._wait()
        if self._views and self._filled:
            self._file.write(self._views[0][: self._filled])
            self._filled = 0

    def close(self) -> None:
        """Release the thread and the buffers (the file stays the caller's to close)."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.exception()  # wait: the thread must be done with the buffer
        if self._io is not None:
            self._io.shutdown(wait=True)
            self._io = None
        self._views = []


def _set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for `fd`; whether it is on afterwards (tmpfs and others refuse it)."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    wanted = flags | os.O_DIRECT if on else flags & ~os.O_DIRECT
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, wanted)
    except OSError:
        return bool(flags & os.O_DIRECT)
    return on
