"""Lower a writer's CPU and I/O priority, so the training loop's threads and reads go first.

On Linux both priorities belong to a thread (a task), so `lower_priority(threading.get_native_id())`
lowers only the calling thread, and threads it starts inherit it; `tid=0` is the calling task.

The writer process of `async_save="process"` runs SCHED_IDLE by default: it runs on cycles the loop
leaves idle, and a training thread that wakes up takes its core back at once. Nice alone is not enough
on a machine whose cores the loop fills: a niced writer still runs out its time slice when a training
thread wakes at a barrier, and a parallel op waits for its slowest thread. SCHED_IDLE tasks still get
a small share (they are not starved forever on a saturated machine), and while the trainer waits for
its next save its cores are idle, so a save always finishes.

A writer *thread* is only niced: it shares the trainer's GIL, and a SCHED_IDLE thread preempted while
it holds the GIL (by any other process: data-loader workers, another job) would stall the training
thread waiting for that lock until the starved writer runs again, which is the opposite of the goal.
Under torchrun every writer is only niced: there the background write runs collectives (the DCP
write, the weight gather, the commit's report) that every other rank waits on, and a writer starved on
one busy rank would hold up all of them.

`SAVEPOINT_WRITER_PRIORITY` overrides the policy: `idle`, `nice` (nice +10 only) or `normal` (leave the
writer at the trainer's priority, e.g. when the loop leaves cores idle and the disk is fast).
"""

from __future__ import annotations

import contextlib
import ctypes
import os

NICE = 10
POLICIES = ("idle", "nice", "normal")
_IOPRIO_SET = {"x86_64": 251, "aarch64": 30}
_IOPRIO_WHO_PROCESS = 1  # a task id: one thread on Linux
_BEST_EFFORT_LOWEST = (2 << 13) | 7  # IOPRIO_CLASS_BE, level 7


def writer_policy(*, separate_process: bool = False) -> str:
    """The configured policy (`SAVEPOINT_WRITER_PRIORITY`, else by kind of writer and world size); an
    unknown value is refused by name."""
    alone = int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1
    default = "idle" if separate_process and alone else "nice"
    policy = os.environ.get("SAVEPOINT_WRITER_PRIORITY", default).strip().lower() or default
    if policy not in POLICIES:
        raise ValueError(f"SAVEPOINT_WRITER_PRIORITY must be one of {', '.join(POLICIES)}, got {policy!r}")
    return policy


def lower_priority(tid: int = 0, *, separate_process: bool = False) -> None:
    """Lower `tid`'s CPU priority (`writer_policy`) and give it the lowest best-effort I/O priority.
    `separate_process`: the caller is a writer process, which shares no lock with the trainer. Best
    effort: a refusal only costs fairness."""
    policy = writer_policy(separate_process=separate_process)
    if policy == "normal":
        return
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + NICE))
    if policy == "idle":
        with contextlib.suppress(OSError, AttributeError):
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    nr = _IOPRIO_SET.get(os.uname().machine)
    if nr is not None:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).syscall(nr, _IOPRIO_WHO_PROCESS, tid, _BEST_EFFORT_LOWEST)
