"""Large CPU buffers that fill fast: backed by transparent huge pages where the kernel offers them.

Streaming a model allocates a fresh buffer for every tensor read or produced. With 4 KiB pages a
26 GB base costs millions of page faults (each one a zeroed page and a trip through the kernel),
which on a 2-core machine took more CPU than the copies themselves. Asking for huge pages on the
buffer before its first touch (`madvise(MADV_HUGEPAGE)`, honoured when THP is set to `madvise` or
`always`) cuts the faults 512-fold. Where that is not possible the buffer is simply a plain
`torch.empty`.

    >>> buf = empty_buffer((4096, 4096), torch.bfloat16)  # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import mmap
import sys
import threading
from collections.abc import Callable

import torch

Allocate = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]  # (shape, dtype) -> uninitialised tensor
_HUGE_PAGE = 2 << 20
_MIN_BYTES = 8 << 20  # below this, the faults saved do not pay for the call


def _madvise() -> Callable[[int, int, int], int] | None:
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _madvise()


def empty_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """`torch.empty(shape, dtype=dtype)` on the CPU, asking for huge pages when it is large."""
    t = torch.empty(shape, dtype=dtype)
    nbytes = t.numel() * t.element_size()
    if _MADVISE is not None and nbytes >= _MIN_BYTES:
        start = -(-t.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE  # madvise wants aligned ranges
        end = (t.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
        if end > start:
            _MADVISE(start, end - start, mmap.MADV_HUGEPAGE)  # a refusal only costs speed
    return t


class BufferPool:
    """Recycles large buffers within one streaming pass, so most tensors land in memory that is
    already mapped: a fresh buffer is zeroed page by page by the kernel, which profiled at a quarter
    of a merge's CPU time. Only buffers this pool handed out are ever taken back, and only when the
    caller says it is done with them (`give`); at most `keep` idle buffers are held. Thread-safe.
    """

    def __init__(self, keep: int = 4) -> None:
        self._keep = keep
        self._lock = threading.Lock()
        self._idle: list[torch.Tensor] = []  # uint8 buffers, free to hand out again
        self._issued: dict[int, torch.Tensor] = {}  # storage address -> its whole buffer

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor of `shape` and `dtype`, in a recycled buffer when one fits."""
        nbytes = int(torch.Size(shape).numel()) * dtype.itemsize
        if nbytes < _MIN_BYTES:
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            fitting = [i for i, b in enumerate(self._idle) if b.numel() >= nbytes]
            best = min(fitting, key=lambda i: self._idle[i].numel()) if fitting else None
            buf = (
                self._idle.pop(best) if best is not None else None
            )  # by position: == on tensors compares values
        if buf is None:
            # Room to spare, so that a buffer made for one tensor also serves a read of its aligned
            # window (savepoint.io.direct: up to a few KiB more) when it comes back.
            buf = empty_buffer((-(-nbytes // _HUGE_PAGE) * _HUGE_PAGE + _HUGE_PAGE,), torch.uint8)
        with self._lock:
            self._issued[buf.data_ptr()] = buf
        return buf[:nbytes].view(dtype).view(shape)

    def give(self, t: torch.Tensor) -> None:
        """Take back a tensor from `take` whose caller no longer uses it (others are ignored)."""
        if t.device.type != "cpu" or t.numel() == 0:
            return
        with self._lock:
            buf = self._issued.pop(t.untyped_storage().data_ptr(), None)
            if buf is not None:
                self._idle.append(buf)
                if len(self._idle) > self._keep:  # drop the smallest: big ones fit any request
                    self._idle.pop(min(range(len(self._idle)), key=lambda i: self._idle[i].numel()))
