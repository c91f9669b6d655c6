"""Async saves: copy the state to host memory, then write it on one background thread.

    job = capture(request, snapshot=True)     # pipeline/save.py; snapshot_job(job): host copies, in place
    writer.submit(lambda: write_checkpoint(job))
    writer.wait()                             # durable, or the background error is raised here

Host buffers are pooled per checkpoint root and reused from save to save: allocating (and, for GPU
state, pinning) gigabytes on every save would cost more than the copy itself. A buffer is only
reused after the save that wrote from it has finished, because the manager waits for the save in
flight before it captures the next one.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import traceback
import weakref
from collections.abc import Callable, MutableMapping
from types import FrameType
from typing import Any, Protocol

import torch

from savepoint import distributed
from savepoint.errors import SavepointError
from savepoint.io.direct import direct_writes
from savepoint.io.priority import lower_priority
from savepoint.snapshot_dcp import host_copy

BufferKey = tuple[str, tuple[int, ...], torch.dtype]


# ---------------------------------------------------------------- host snapshot


class HostBufferPool:
    """Host tensors keyed by (name, shape, dtype), kept from one snapshot to the next."""

    def __init__(self) -> None:
        self._buffers: dict[BufferKey, torch.Tensor] = {}
        self._taken: dict[BufferKey, torch.Tensor] = {}
        self.devices: set[torch.device] = set()

    def begin(self) -> None:
        self._taken = {}
        self.devices = set()

    def copy(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A host copy of `tensor` in a pooled buffer; device copies are queued, not waited for."""
        src = tensor.detach()
        key = (name, tuple(src.shape), src.dtype)
        on_cuda = src.device.type == "cuda"
        buf = self._buffers.get(key)
        if buf is None:
            # Pinned memory lets the device copy run asynchronously (DMA) instead of staging.
            buf = torch.empty(src.shape, dtype=src.dtype, pin_memory=on_cuda and torch.cuda.is_available())
        self._taken[key] = buf
        if on_cuda:
            self.devices.add(src.device)
        buf.copy_(src, non_blocking=on_cuda)
        return buf

    def end(self) -> None:
        """Wait for queued device copies; drop buffers this snapshot did not use (shapes changed)."""
        for device in self.devices:
            torch.cuda.synchronize(device)
        self._buffers, self._taken = self._taken, {}

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


_POOLS: dict[str, HostBufferPool] = {}
_POOLS_LOCK = threading.Lock()


def pool_for(root: str) -> HostBufferPool:
    """The buffer pool of one checkpoint root (a root has one writer at a time: it is locked)."""
    key = os.path.abspath(root)
    with _POOLS_LOCK:
        return _POOLS.setdefault(key, HostBufferPool())


def release_buffers(root: str | None = None) -> None:
    """Free the pooled host buffers of `root` (of every root when None), e.g. when a manager closes."""
    with _POOLS_LOCK:
        if root is None:
            _POOLS.clear()
        else:
            _POOLS.pop(os.path.abspath(root), None)


def snapshot_job(job: Any) -> None:
    """Replace every tensor of `job` (model state, blob tensors, adapter state, DCP shards) by a host
    copy, in place.

    When this returns the copies are complete: training may change the live tensors at once.
    """
    if job.adapter is not None and job.adapter_state is None and distributed.rank() == 0:
        raise SavepointError(
            "async_save cannot snapshot this LoRA adapter: the save job carries no `adapter_state` to copy, "
            "so the background writer would read weights that training is changing. Use async_save=False."
        )
    pool = pool_for(job.request.root)
    pool.begin()
    try:
        if job.model_state is not None:
            _copy_into(pool, "model", job.model_state)
        for relbase, (_doc, tensors) in job.blobs.items():
            _copy_into(pool, relbase, tensors)
        for adapter_name, tensors in (job.adapter_state or {}).items():
            _copy_into(pool, f"adapter/{adapter_name}", tensors)
        for name, tensor in job.dcp_tensors.items():  # DTensors and ShardedTensors keep their layout for DCP
            job.dcp_tensors[name] = host_copy(pool, f"dcp:{name}", tensor)
        for name, tensor in (job.model_shards or {}).items():  # gathered to rank 0 by the write phase
            job.model_shards[name] = host_copy(pool, f"shard:{name}", tensor)
    finally:
        pool.end()


def _copy_into(pool: HostBufferPool, prefix: str, tensors: MutableMapping[str, torch.Tensor]) -> None:
    for name, tensor in tensors.items():
        tensors[name] = pool.copy(f"{prefix}:{name}", tensor)


# ---------------------------------------------------------------- background writer


class BackgroundWriter:
    """Runs one save at a time on a background thread and never loses its error.

    `submit` first waits for the save in flight; `wait` blocks until it is done and raises what it
    raised. A save still running when the interpreter exits, or when SIGTERM arrives, is finished first.
    """

    def __init__(self, *, name: str = "savepoint-writer") -> None:
        self.name = name
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        register_writer(self)

    @property
    def busy(self) -> bool:
        """True while a save is being written."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, fn: Callable[[], object]) -> None:
        """Run `fn` in the background, after the previous save finished (its error is raised here)."""
        self.wait()
        # A daemon thread, joined by our atexit hook: interpreter exit waits for it either way, but
        # this way we can say so on stderr and report an error nobody collected.
        thread = threading.Thread(target=self._run, args=(fn,), name=self.name, daemon=True)
        self._thread = thread
        thread.start()

    def wait(self) -> None:
        """Block until the save in flight is durable; raise its error, once, if it failed."""
        self._join()
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _run(self, fn: Callable[[], object]) -> None:
        # The loop's threads go first (this thread and the helpers it starts run niced), and files are
        # written with O_DIRECT: no copy into the page cache on the training process's cores.
        lower_priority(threading.get_native_id())
        try:
            with direct_writes():
                fn()
        except BaseException as exc:  # kept for wait(): an error in a thread must not vanish
            self._error = exc

    def _join(self) -> None:
        thread = self._thread
        if thread is not None:
            thread.join()
            if self._thread is thread:
                self._thread = None

    def finish(self, reason: str) -> None:
        """Finish the save in flight without raising (exit paths); report an uncollected error."""
        announce_finish(self.busy, reason)
        self._join()
        error, self._error = self._error, None
        if error is not None:
            print(f"savepoint: a background save failed before {reason}:", file=sys.stderr)
            traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)


# ---------------------------------------------------------------- exit and SIGTERM


class Finishable(Protocol):
    def finish(self, reason: str) -> None: ...


_LIVE_WRITERS: weakref.WeakSet[Finishable] = weakref.WeakSet()
_HOOKS_INSTALLED = False


def announce_finish(busy: bool, reason: str) -> None:
    """Tell the user why the process does not end at once: a save in flight is being finished."""
    if busy:
        print(
            f"savepoint: finishing the checkpoint being written before {reason}", file=sys.stderr, flush=True
        )


def register_writer(writer: Finishable) -> None:
    """Have `writer.finish(reason)` called at interpreter exit and on SIGTERM."""
    _LIVE_WRITERS.add(writer)
    _install_exit_hooks()


def finish_all(reason: str = "exit") -> None:
    """Finish every save in flight in this process (atexit and the SIGTERM handler call this)."""
    for writer in list(_LIVE_WRITERS):
        writer.finish(reason)


def _install_exit_hooks() -> None:
    global _HOOKS_INSTALLED
    if _HOOKS_INSTALLED:
        return
    _HOOKS_INSTALLED = True
    atexit.register(finish_all, "exit")
    _install_sigterm_handler()


def _install_sigterm_handler() -> None:
    """Finish in-flight saves on SIGTERM, then behave exactly as the previous handler would.

    We only take over the default action (and chain to a Python handler someone installed): an
    ignored SIGTERM, or one handled outside Python, is left alone. Signals can only be set from the
    main thread; a manager created elsewhere relies on atexit.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_IGN or previous is None:
        return

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        finish_all("SIGTERM")
        if callable(previous):
            previous(signum, frame)
            return
        # The default action: die by the signal, so the parent sees "terminated by SIGTERM".
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, on_sigterm)
