"""The writer process of `async_save="process"`: writes, hashes and commits checkpoints for its trainer.

    python -m savepoint.writer_process FD      # started by async_writer.ProcessWriter, never by hand

It reads messages from the socket FD: ("segment", size) followed by a memfd (a shared snapshot
segment to map), ("drop",) (unmap every segment: the trainer replaces them), and ("save", SavePlan).
A plan names every file of one checkpoint as inline bytes (headers, JSON) and regions of the shared
segments (tensor bytes); this process writes them into a staged directory (the same
`DedupingStagedDir` a synchronous save uses: hashed while written, parent files hardlinked), commits
it (manifest last, atomic rename), applies retention and answers ("done", path) or ("error", ...).
`write_plan` is also what the writer thread of `async_save=True` runs, on its own arena.

It runs in its own session at a lower CPU and I/O priority, so the trainer's cores come first and
a Ctrl-C or a signal to the trainer's process group does not reach it. It never reads tensor bytes
from the pipe and never unpickles anything from disk. When the trainer goes away (exit or SIGKILL),
the socket reaches EOF: a save already handed over is finished and committed first, because the
loop only reads the next message after the current one is done; then the process exits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle
from typing import Any, Protocol

from savepoint import discovery, policy
from savepoint.io.direct import direct_writes
from savepoint.io.priority import lower_priority
from savepoint.io.shared_arena import AttachedSegments, Region
from savepoint.manifest import build_manifest
from savepoint.storage import memory_tier
from savepoint.storage.dedupe import DedupingStagedDir
from savepoint.storage.local import delete_checkpoint_dir

Chunk = bytes | Region  # inline bytes, or a region of a shared segment


@dataclass
class SavePlan:
    """One checkpoint, ready to write: plain data only (it is pickled over our own socket)."""

    root: str
    final_name: str
    parent: str | None
    files: dict[str, list[Chunk]]
    kind: str
    manifest_fields: dict[str, Any]
    retention: policy.RetentionPolicy
    step: int
    pause_s: float = 0.0  # tests only: sleep after each file, to kill the trainer mid-write
    memory_tier: bool = False  # copy the committed checkpoint to shared memory (storage/memory_tier.py)


class RegionSource(Protocol):
    def view(self, region: Region) -> memoryview: ...


def write_plan(plan: SavePlan, segments: RegionSource) -> str:
    """Write, hash and commit the plan's checkpoint, then prune; return the committed path.

    `segments`: the writer process's AttachedSegments, or the thread writer's own SharedArena."""
    staged = DedupingStagedDir(plan.root, plan.final_name, previous=plan.parent)
    try:
        for relpath, chunks in plan.files.items():
            with staged.create(relpath) as out:
                for chunk in chunks:
                    out.write(chunk if isinstance(chunk, bytes) else segments.view(chunk))
            if plan.pause_s:
                import time

                time.sleep(plan.pause_s)
        manifest = build_manifest(plan.kind, staged.entries, **plan.manifest_fields)
        path = staged.commit(manifest.to_json(), replace=True)
    except BaseException:
        staged.abort()
        raise
    if plan.memory_tier:  # from the snapshot in memory, not read back from the disk just written
        held = {rel: _chunk_views(chunks, segments) for rel, chunks in plan.files.items()}
        memory_tier.publish(plan.root, path, contents=held)
    apply_retention(plan.root, plan.retention, protect=plan.step)
    return path


def _chunk_views(chunks: list[Chunk], segments: RegionSource) -> Iterator[bytes | memoryview]:
    for chunk in chunks:
        yield chunk if isinstance(chunk, bytes) else segments.view(chunk)


def apply_retention(root: str, rules: policy.RetentionPolicy, *, protect: int) -> None:
    """Delete what the retention rules let go (local roots: the only ones this process writes)."""
    infos = discovery.list_checkpoints(root)
    for step in policy.steps_to_delete(infos, rules):
        if step == protect:
            continue
        info = next(i for i in infos if i.step == step)
        try:
            delete_checkpoint_dir(info.path)
        except OSError as exc:  # a failed deletion must never fail the save that just committed
            warnings.warn(
                f"could not delete {info.path} ({exc}); it will be retried on the next save", stacklevel=2
            )


def serve(conn: Connection) -> int:
    segments = AttachedSegments()
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return 0  # the trainer is gone or closed us, and nothing is in flight: done
        if message[0] == "segment":
            fd = recv_handle(conn)
            try:
                segments.attach(fd, message[1])
            finally:
                os.close(fd)
        elif message[0] == "drop":  # the trainer replaces its segments (a state that grew or shrank)
            segments.close()
        elif message[0] == "save":
            try:
                reply: tuple[Any, ...] = ("done", write_plan(message[1], segments))
            except BaseException as exc:  # reported to the trainer's wait(); this process serves on
                reply = ("error", type(exc).__name__, str(exc), traceback.format_exc())
            _send(conn, reply)


def _send(conn: Connection, reply: tuple[Any, ...]) -> None:
    with contextlib.suppress(OSError):  # the trainer died after the hand-off: the save is committed anyway
        conn.send(reply)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the trainer decides when we stop, by closing the socket
    lower_priority(separate_process=True)  # SCHED_IDLE: it shares no GIL with the trainer
    with direct_writes():  # tensor bytes go from the shared arena to the disk, not via the page cache
        return serve(Connection(int(argv[1])))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
