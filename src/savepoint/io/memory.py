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
from collections.abc import Callable

import torch

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


def empty_buffer(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """`torch.empty(shape, dtype=dtype)` on the CPU, asking for huge pages when it is large."""
    t = torch.empty(shape, dtype=dtype)
    nbytes = t.numel() * t.element_size()
    if _MADVISE is not None and nbytes >= _MIN_BYTES:
        start = -(-t.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE  # madvise wants aligned ranges
        end = (t.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
        if end > start:
            _MADVISE(start, end - start, mmap.MADV_HUGEPAGE)  # a refusal only costs speed
    return t
