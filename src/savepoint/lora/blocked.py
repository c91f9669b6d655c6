"""The plain LoRA merge of a large weight, `W + scaling * B @ A`, in cache-sized blocks of rows.

Why not one `torch.addmm` over the whole weight: that makes a float32 copy of W (twice a bf16 base
tensor), sweeps memory four times (cast, addmm, finite check, cast back), and its OpenMP team stalls
whenever one of its threads is descheduled on a busy machine. Here each block of rows is cast, merged,
checked and cast back while it sits in the CPU cache, by worker threads that each run torch
single-threaded (`torch.set_num_threads` is per thread), so no worker ever waits on another.

    >>> with BlockedMerger() as merger:  # doctest: +SKIP
    ...     merged = merger.merge_linear(w, a, b, scaling=2.0, dtype=torch.bfloat16)
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from types import TracebackType

import torch

from savepoint.io.memory import Allocate, empty_buffer
from savepoint.lora.math import fits

BLOCK_ELEMENTS = 1 << 20  # float32 elements per block: 4 MB, cache-sized
_MAX_WORKERS = 8


def _single_threaded_torch() -> None:
    torch.set_num_threads(1)


class BlockedMerger(AbstractContextManager["BlockedMerger"]):
    """A pool of single-threaded torch workers for `merge_linear`; use it as a context manager."""

    def __init__(self, workers: int | None = None, allocate: Allocate = empty_buffer) -> None:
        self._allocate = allocate
        count = workers or min(
            _MAX_WORKERS, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        )
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, count),
            initializer=_single_threaded_torch,
            thread_name_prefix="savepoint-merge",
        )

    def merge_linear(
        self,
        weight: torch.Tensor,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        *,
        scaling: float,
        dtype: torch.dtype,
    ) -> torch.Tensor | None:
        """`weight + scaling * lora_b @ lora_a` as a new `dtype` tensor, computed in float32 as
        `savepoint.lora.math.merge_linear` does, block by block (BLAS may sum the rank-r products in
        another order: a last-bit difference in float32 at most). None when the weight is not 2-D, the
        dtype is not floating, or some block would not fit `dtype` (the caller's full path then
        explains the non-finite value, or accepts it)."""
        if weight.dim() != 2 or not dtype.is_floating_point:
            return None
        a, b = lora_a.detach().to(torch.float32), lora_b.detach().to(torch.float32)
        w = weight.detach()
        out = self._allocate(tuple(w.shape), dtype)
        rows = max(1, BLOCK_ELEMENTS // max(1, w.shape[1]))

        def block(start: int) -> bool:
            src = w[start : start + rows]
            part = self._scratch(src.numel()).view(src.shape)
            part.copy_(src)  # the cast to float32, into this worker's reused buffer
            part.addmm_(b[start : start + rows], a, alpha=scaling)
            if not fits(part, dtype):
                return False
            out[start : start + rows].copy_(part)
            return True

        results = list(self._pool.map(block, range(0, w.shape[0], rows)))
        return out if all(results) else None

    def _scratch(self, numel: int) -> torch.Tensor:
        """This worker thread's float32 block buffer: allocating 4 MB per block would map and unmap
        fresh pages every time (page faults, zeroing, TLB shootdowns across the workers)."""
        buf: torch.Tensor | None = getattr(self._local, "buf", None)
        if buf is None or buf.numel() < numel:
            buf = self._local.buf = torch.empty(max(numel, BLOCK_ELEMENTS), dtype=torch.float32)
        return buf[:numel]

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
