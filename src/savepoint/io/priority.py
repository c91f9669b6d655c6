"""Lower a writer's CPU and I/O priority, so the training loop's threads and reads go first.

On Linux both priorities belong to a thread (a task), so `lower_priority(threading.get_native_id())`
lowers only the calling thread, and threads it starts inherit it; `tid=0` is the calling task.
"""

from __future__ import annotations

import contextlib
import ctypes
import os

NICE = 10
_IOPRIO_SET = {"x86_64": 251, "aarch64": 30}
_IOPRIO_WHO_PROCESS = 1  # a task id: one thread on Linux
_BEST_EFFORT_LOWEST = (2 << 13) | 7  # IOPRIO_CLASS_BE, level 7


def lower_priority(tid: int = 0) -> None:
    """Nice `tid` by NICE and give it the lowest best-effort I/O priority (best effort: a refusal
    only costs fairness)."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + NICE))
    nr = _IOPRIO_SET.get(os.uname().machine)
    if nr is not None:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).syscall(nr, _IOPRIO_WHO_PROCESS, tid, _BEST_EFFORT_LOWEST)
