"""Host memory shared with another process: anonymous memfd segments, refilled from the start each save.

The training process copies a checkpoint's bytes into the arena (`put`) and hands the writer process
only (segment, offset, length) triples, so no tensor byte goes through a pipe. Segments are memfds,
not named /dev/shm files: the memory belongs to whoever still maps it, so nothing leaks when either
process dies, and there is no name to clean up.

    arena = SharedArena(on_new_segment=share)  # share(fd, size) passes the fd to the other process
    arena.reset()                              # a new save: reuse every segment from the start
    where = arena.put(memoryview(chunk))       # -> (segment, offset, nbytes)

Reuse is what bounds memory: a save of the same state fills the same segments again, and a new
segment is only made when a save needs more than all earlier ones held (each new segment is at
least as large as all before it together, so there are few).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable

from savepoint.io.direct import ALIGN

Region = tuple[int, int, int]  # (segment index, offset, nbytes)
_MIN_SEGMENT = 64 << 20


class SharedArena:
    """Bump-allocated shared segments. Not thread-safe: one save fills it at a time."""

    def __init__(
        self, on_new_segment: Callable[[int, int], None], *, min_segment: int = _MIN_SEGMENT
    ) -> None:
        self._on_new_segment = on_new_segment
        self._min_segment = min_segment
        self._maps: list[mmap.mmap] = []
        self._views: list[memoryview] = []
        self._segment = 0  # where the next put goes
        self._offset = 0

    @property
    def nbytes(self) -> int:
        """Shared memory held (the high-water mark of one save's bytes, rounded up to segments)."""
        return sum(len(m) for m in self._maps)

    @property
    def segments(self) -> int:
        return len(self._maps)

    def reset(self) -> None:
        """Start filling from the beginning again (the previous save's bytes are no longer needed)."""
        self._segment = self._offset = 0

    def put(self, data: memoryview, *, file_offset: int = 0) -> Region:
        """Copy `data` (bytes-like, contiguous) into the arena; return where it lies.

        The copy starts at an arena offset congruent to `file_offset` modulo ALIGN (segments are
        page-aligned), so the writer process can hand the block-aligned part of it to an O_DIRECT
        write of the file straight from the shared memory (io/direct.py)."""
        src = data if data.format == "B" and data.ndim == 1 else data.cast("B")
        nbytes = src.nbytes
        while self._segment < len(self._maps):
            self._offset += (file_offset - self._offset) % ALIGN
            if self._offset + nbytes <= len(self._maps[self._segment]):
                break
            self._segment, self._offset = self._segment + 1, 0
        if self._segment == len(self._maps):
            self._grow(nbytes + ALIGN)
            self._offset = file_offset % ALIGN
        region = (self._segment, self._offset, nbytes)
        self._views[self._segment][self._offset : self._offset + nbytes] = src
        self._offset += nbytes
        return region

    def _grow(self, at_least: int) -> None:
        size = max(at_least, self._min_segment, self.nbytes)
        size = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
        fd = os.memfd_create("savepoint-snapshot", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            mapped = mmap.mmap(fd, size)
            self._on_new_segment(fd, size)  # the fd is passed on (duplicated) before ours is closed
        finally:
            os.close(fd)  # our mapping (and the other process's) keeps the memory alive
        self._maps.append(mapped)
        self._views.append(memoryview(mapped))
        self._offset = 0

    def close(self) -> None:
        """Unmap every segment (the memory is freed once the other process unmaps it too)."""
        unmap(self._maps, self._views)
        self.reset()


def unmap(maps: list[mmap.mmap], views: list[memoryview]) -> None:
    """Release the views first (a mapping with a live view cannot close), then the mappings; empty both."""
    for view in views:
        view.release()
    for mapped in maps:
        mapped.close()
    maps.clear()
    views.clear()


class AttachedSegments:
    """The writer process's side: the segments it was sent, in order, and reads of regions from them."""

    def __init__(self) -> None:
        self._maps: list[mmap.mmap] = []
        self._views: list[memoryview] = []

    def attach(self, fd: int, size: int) -> None:
        mapped = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        self._maps.append(mapped)
        self._views.append(memoryview(mapped))

    def view(self, region: Region) -> memoryview:
        segment, offset, nbytes = region
        return self._views[segment][offset : offset + nbytes]

    def close(self) -> None:
        unmap(self._maps, self._views)
