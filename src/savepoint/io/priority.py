"""Lower a writer's CPU and I/O priority, so the training loop's threads and reads go first.

On Linux both priorities belong to a thread (a task), so `lower_priority(threading.get_native_id())`
lowers only the calling thread, and threads it starts inherit it; `tid=0` is the calling task.

The CPU policy is SCHED_IDLE by default: a writer runs on cycles the loop leaves idle, and a training
thread that wakes up takes its core back at once. Nice alone is not enough on a machine whose cores the
loop fills: a niced writer still runs out its time slice when a training thread wakes at a barrier, and
a parallel op waits for its slowest thread. SCHED_IDLE tasks still get a small share (they are not
starved forever on a saturated machine), so a save always finishes.

Under torchrun the default is `nice`: there the background write runs collectives (the DCP write, the
weight gather, the commit's report) that every other rank waits on, and a writer starved on one busy
rank would hold up all of them. One process has nobody waiting on its writer but its own next save(),
and while the trainer waits in save() its cores are idle, so the writer gets them.

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


def writer_policy() -> str:
    """The configured policy (`SAVEPOINT_WRITER_PRIORITY`, else by world size); an unknown value is
    refused by name."""
    default = "nice" if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else "idle"
    policy = os.environ.get("SAVEPOINT_WRITER_PRIORITY", default).strip().lower() or default
    if policy not in POLICIES:
        raise ValueError(f"SAVEPOINT_WRITER_PRIORITY must be one of {', '.join(POLICIES)}, got {policy!r}")
    return policy


def lower_priority(tid: int = 0, policy: str | None = None) -> None:
    """Lower `tid`'s CPU priority (`policy`, default `writer_policy()`) and give it the lowest
    best-effort I/O priority. Best effort: a refusal only costs fairness."""
    policy = policy or writer_policy()
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
