"""New files written with O_DIRECT: the disk reads the bytes from our memory, the page cache is skipped.

A buffered write() copies every byte into the page cache in the kernel, and the kernel later writes
it back from there: on our 2-core machine that copy cost ~3x a memcpy of the state per save, most of
an async writer's CPU, taken from the training loop (BENCHMARKS.md, "Writer CPU per save"). With
O_DIRECT the device copies from user memory by DMA. It asks for aligned offsets, lengths and
addresses, which a safetensors file does not have (its header is any multiple of 8 bytes long), so
`DirectFile` writes whole aligned blocks: straight from the caller's memory where the caller's
bytes line up with the file's blocks (the process writer's shared arena lays them out so), through
an aligned bounce buffer otherwise (one user-space copy of bytes just hashed, still in the CPU
cache); the last partial block is written padded and the file truncated to its exact size. The
bytes on disk are exactly what a buffered write would have left.

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
from contextvars import ContextVar
from typing import BinaryIO

import numpy as np

ALIGN = 4096  # a page: satisfies every logical block size in use (512 and 4096)
_BOUNCE = 8 << 20
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


def open_for_write(path: str) -> DirectFile | BinaryIO:
    """A new file at `path`, truncated: a DirectFile inside `direct_writes()`, else a buffered file."""
    if not enabled():
        return open(path, "wb")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    return DirectFile(fd)


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


def _set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for `fd`; whether it is on afterwards (tmpfs and others refuse it)."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    wanted = flags | os.O_DIRECT if on else flags & ~os.O_DIRECT
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, wanted)
    except OSError:
        return bool(flags & os.O_DIRECT)
    return on
