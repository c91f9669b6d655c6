"""Host memory shared with another process: anonymous memfd segments, refilled from the start each save.

The training process copies a checkpoint's bytes into the arena (`put`) and hands the writer process
only (segment, offset, length) triples, so no tensor byte goes through a pipe. Segments are memfds,
not named /dev/shm files: the memory belongs to whoever still maps it, so nothing leaks when either
process dies, and there is no name to clean up.

    arena = SharedArena(on_new_segment=share, on_drop=forget)  # share(fd, size): to the other process
    arena.begin(expected)                      # a new save of about `expected` bytes: one segment
    where = arena.put(memoryview(chunk))       # -> (segment, offset, nbytes)

Reuse is what bounds memory: `begin` sizes one segment for the whole save (the caller's estimate,
plus what the previous save took beyond its estimate), and every later save of the same state fills
that segment again. A save that outgrows it (the estimate missed a file) adds a segment for the rest;
the next `begin` replaces both by one segment of the size that save needed. A state that grows or
shrinks gets one new segment of its new size.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable

import torch

from savepoint.io.direct import ALIGN

Region = tuple[int, int, int]  # (segment index, offset, nbytes)
_TORCH_COPY_FROM = 1 << 20  # larger copies use torch's (parallel, GIL released); smaller ones a memcpy
_SHRINK_BELOW = 2  # a segment more than twice what a save needs is replaced by a smaller one


class SharedArena:
    """Bump-allocated shared segments. Not thread-safe: one save fills it at a time.

    `on_new_segment(fd, size)` is called for each new segment (the fd is closed after it returns);
    `on_drop()` when every segment is about to be unmapped and the indices start again from 0."""

    def __init__(
        self, on_new_segment: Callable[[int, int], None], *, on_drop: Callable[[], None] = lambda: None
    ) -> None:
        self._on_new_segment = on_new_segment
        self._on_drop = on_drop
        self._maps: list[mmap.mmap] = []
        self._views: list[memoryview] = []
        self._tensors: list[torch.Tensor] = []  # uint8 views of the segments, for torch's copy
        self._segment = 0  # where the next put goes
        self._offset = 0
        self._needed = 0  # what this save's puts would take in one segment (alignment included)
        self._expected = 0  # what begin() was told this save would take

    @property
    def nbytes(self) -> int:
        """Shared memory held (one save's bytes, rounded up to pages)."""
        return sum(len(m) for m in self._maps)

    @property
    def segments(self) -> int:
        return len(self._maps)

    def begin(self, expected: int) -> None:
        """Start a new save expected to take about `expected` bytes (the previous save's bytes are no
        longer needed). One segment is sized for it: the estimate, plus what the previous save took
        beyond its own estimate (files nobody counted, which a save of the same model writes again)."""
        missed = max(0, self._needed - self._expected)
        need = _pages(expected + missed)
        self._expected = expected
        held = self.nbytes
        if self.segments != 1 or held < need or held > _SHRINK_BELOW * need:
            self._drop()
            if need:
                self._grow(need)
        self.reset()

    def reset(self) -> None:
        """Start filling from the beginning again, in the segments held."""
        self._segment = self._offset = self._needed = 0

    def put(self, data: memoryview, *, file_offset: int = 0) -> Region:
        """Copy `data` (bytes-like, contiguous) into the arena; return where it lies.

        The copy starts at an arena offset congruent to `file_offset` modulo ALIGN (segments are
        page-aligned), so the writer process can hand the block-aligned part of it to an O_DIRECT
        write of the file straight from the shared memory (io/direct.py)."""
        src = data if data.format == "B" and data.ndim == 1 else data.cast("B")
        nbytes = src.nbytes
        self._needed += (file_offset - self._needed) % ALIGN + nbytes
        while self._segment < len(self._maps):
            self._offset += (file_offset - self._offset) % ALIGN
            if self._offset + nbytes <= len(self._maps[self._segment]):
                break
            self._segment, self._offset = self._segment + 1, 0
        if self._segment == len(self._maps):
            # Outgrown (the estimate missed something): at least double, so a save needs few segments;
            # the next begin() folds them into one.
            self._grow(max(nbytes + ALIGN, self.nbytes))
            self._offset = file_offset % ALIGN
        region = (self._segment, self._offset, nbytes)
        if nbytes >= _TORCH_COPY_FROM and not src.readonly:
            # The snapshot's one copy: as fast as torch copies a tensor (the memcpy floor of a snapshot).
            dst = self._tensors[self._segment][self._offset : self._offset + nbytes]
            dst.copy_(torch.frombuffer(src, dtype=torch.uint8))
        else:
            self._views[self._segment][self._offset : self._offset + nbytes] = src
        self._offset += nbytes
        return region

    def view(self, region: Region) -> memoryview:
        """The bytes of a region `put` returned (a writer in this process reads them from here)."""
        segment, offset, nbytes = region
        return self._views[segment][offset : offset + nbytes]

    def _grow(self, at_least: int) -> None:
        size = _pages(at_least)
        fd = os.memfd_create("savepoint-snapshot", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            mapped = mmap.mmap(fd, size)
            self._on_new_segment(fd, size)  # the fd is passed on (duplicated) before ours is closed
        finally:
            os.close(fd)  # our mapping (and the other process's) keeps the memory alive
        self._maps.append(mapped)
        self._views.append(memoryview(mapped))
        self._tensors.append(torch.frombuffer(mapped, dtype=torch.uint8))
        self._segment, self._offset = len(self._maps) - 1, 0

    def _drop(self) -> None:
        if self._maps:
            self._on_drop()
            self._unmap()

    def _unmap(self) -> None:
        self._tensors.clear()  # they hold the mappings' buffers: a mapping with exports cannot close
        unmap(self._maps, self._views)

    def close(self) -> None:
        """Unmap every segment (the memory is freed once the other process unmaps it too)."""
        self._unmap()
        self.reset()


def _pages(nbytes: int) -> int:
    return -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE


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
        """Map the next segment (its index is the number attached before it, since the last `close`)."""
        mapped = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        self._maps.append(mapped)
        self._views.append(memoryview(mapped))

    def view(self, region: Region) -> memoryview:
        segment, offset, nbytes = region
        return self._views[segment][offset : offset + nbytes]

    def close(self) -> None:
        """Unmap every segment: the trainer dropped them (or we are done); indices start again from 0."""
        unmap(self._maps, self._views)
