"""Async saves that record the checkpoint at save() time and write it later: the writer process of
`async_save="process"`, and the writer thread of `async_save=True` at world size 1 on a local root.

    writer = ProcessWriter()                   # starts `python -m savepoint.writer_process` once
    writer.submit_job(job, retention)          # copies the state into shared memory, hands it over
    writer.wait()                              # committed, or the writer's error is raised here

`submit_job` runs the pipeline's write phase (`pipeline.save.write_files`) against a `RecordingDir`: instead
of files it records, per file, the inline bytes (headers, JSON) and, for everything large, a region
of a `SharedArena` it copied the bytes into. That copy is the snapshot, and the only work the
training process does; hashing, writing, fsync, commit and retention run in the writer process, off
the trainer's cores and GIL. Once `submit_job` returns, the save no longer depends on the trainer:
the writer commits it even if the trainer is SIGKILLed a moment later (see writer_process.py).

`ThreadWriter` (async_save=True) records the same plan into an arena of its own and runs the same
`write_plan` on a background thread, so both modes write the same bytes the same way: tensor bytes lie
in the arena at offsets congruent to their file offsets, and go to the disk with O_DIRECT straight
from there (no copy through an aligned buffer). Under torchrun, for object-store roots and for state
on a GPU it runs today's path instead: host copies in pooled buffers and `write_checkpoint` on the
thread (snapshot.py).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from multiprocessing.connection import Connection
from multiprocessing.reduction import send_handle
from typing import Any

import torch

from savepoint.discovery import step_dir_name
from savepoint.errors import SavepointError
from savepoint.io.direct import ALIGN
from savepoint.io.files import read_bytes_inside
from savepoint.io.shared_arena import SharedArena
from savepoint.pipeline.job import SaveJob, manifest_fields
from savepoint.pipeline.save import write_files
from savepoint.policy import RetentionPolicy
from savepoint.snapshot import BackgroundWriter, announce_finish, register_writer
from savepoint.storage.local import TMP_PREFIX
from savepoint.writer_process import Chunk, SavePlan, write_plan

_INLINE_BELOW = 64 << 10  # smaller writes (headers, JSON) travel in the plan itself
_MAX_RECORDED_FILE = 1 << 30  # a file another library wrote into the staging dir (tokenizer, config)


class BackgroundSaveError(SavepointError):
    """A save handed to the writer process failed there; nothing was committed for that step."""

    def __init__(self, message: str, *, remote_traceback: str = "") -> None:
        super().__init__(message)
        self.remote_traceback = remote_traceback


class RecordingDir:
    """Stands in for a StagedDir while the save code runs: records what it would write, in order.

    Files other libraries write into `path` (config.json, tokenizer files) are read back when
    `record`ed; everything else never touches the disk here.
    """

    def __init__(self, root: str, arena: SharedArena) -> None:
        self.path = os.path.join(root, f"{TMP_PREFIX}record-{secrets.token_hex(4)}")
        os.makedirs(self.path)
        self.files: dict[str, list[Chunk]] = {}
        self.entries: dict[str, tuple[int, str]] = {}  # a StagedDir attribute; sizes and hashes come later
        self._arena = arena

    def abspath(self, relpath: str) -> str:
        return os.path.join(self.path, relpath)

    @contextmanager
    def create(self, relpath: str) -> Iterator[_ChunkRecorder]:
        recorder = _ChunkRecorder(self._arena)
        yield recorder
        self.files[relpath] = recorder.chunks

    def write_bytes(self, relpath: str, data: bytes) -> None:
        with self.create(relpath) as out:
            out.write(data)

    def record(self, relpath: str) -> None:
        self.write_bytes(relpath, read_bytes_inside(self.path, relpath, max_bytes=_MAX_RECORDED_FILE))

    def record_unlisted(self) -> None:
        for dirpath, _dirs, names in os.walk(self.path):
            for name in names:
                rel = os.path.relpath(os.path.join(dirpath, name), self.path).replace(os.sep, "/")
                if rel not in self.files:
                    self.record(rel)

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class _ChunkRecorder:
    """The file object `RecordingDir.create` yields: large writes go to the arena, small ones inline."""

    write_chunk = 1 << 62  # whole tensors from the safetensors writer: one parallel copy each, as torch does

    def __init__(self, arena: SharedArena) -> None:
        self._arena = arena
        self.chunks: list[Chunk] = []
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data)
        nbytes = view.nbytes
        at = self.size  # where these bytes go in the file
        self.size += nbytes
        last = self.chunks[-1] if self.chunks else None
        if nbytes < _INLINE_BELOW:
            if isinstance(last, bytes) and len(last) < _INLINE_BELOW:
                self.chunks[-1] = last + view.tobytes()
            else:
                self.chunks.append(view.tobytes())
            return nbytes
        segment, offset, size = self._arena.put(view, file_offset=at)
        if (
            not isinstance(last, bytes)
            and last is not None
            and last[0] == segment
            and last[1] + last[2] == offset
        ):
            self.chunks[-1] = (segment, last[1], last[2] + size)  # consecutive: one region
        else:
            self.chunks.append((segment, offset, size))
        return nbytes


def record_plan(
    job: SaveJob,
    arena: SharedArena,
    retention: RetentionPolicy,
    *,
    pause_s: float = 0.0,
    memory_tier: bool = False,
) -> SavePlan:
    """Run the save code for `job` against a RecordingDir: the plan the writer process executes."""
    request = job.request
    arena.begin(snapshot_estimate(job))
    staged = RecordingDir(request.root, arena)
    try:
        kind, base_model = write_files(job, staged)  # type: ignore[arg-type]  # duck-typed StagedDir
    finally:
        staged.discard()
    return SavePlan(
        root=request.root,
        final_name=step_dir_name(request.step),
        parent=request.parent,
        files=staged.files,
        kind=kind,
        manifest_fields=manifest_fields(request, base_model),
        retention=retention,
        step=request.step,
        pause_s=pause_s,
        memory_tier=memory_tier,
    )


def snapshot_estimate(job: SaveJob) -> int:
    """The arena bytes a recording of `job` takes: its tensors' bytes (a tensor two names share, once),
    plus ALIGN for each, since a file's bytes may start anywhere in a block. Files other libraries
    write (tokenizer, config) are not counted; the arena learns their size from the first save."""
    seen: dict[tuple[int, int], int] = {}
    groups: list[Mapping[str, torch.Tensor]] = [tensors for _doc, tensors in job.blobs.values()]
    groups += [job.model_state or {}, job.dcp_tensors, job.model_shards or {}]
    groups += list((job.adapter_state or {}).values())
    for tensors in groups:
        for tensor in tensors.values():
            nbytes = tensor.numel() * tensor.element_size()
            seen[(tensor.data_ptr() if nbytes else id(tensor), nbytes)] = nbytes
    return sum(seen.values()) + ALIGN * len(seen)


class ThreadWriter(BackgroundWriter):
    """async_save=True: one save at a time on a background thread. `submit_job` records the save into
    this writer's own arena (the snapshot) and writes the plan on the thread; `submit(fn)` runs any
    other save (torchrun, object stores, GPU state) as BackgroundWriter does."""

    records_plan = True

    def __init__(self) -> None:
        super().__init__()
        self.memory_tier = False  # the thread also copies each commit to shared memory (set by the manager)
        self._arena = SharedArena(lambda fd, size: None)  # nobody else maps it

    @property
    def snapshot_bytes(self) -> int:
        """Host memory held for snapshots: about one save's bytes, reused from save to save."""
        return self._arena.nbytes

    def submit_job(self, job: SaveJob, retention: RetentionPolicy) -> None:
        """Snapshot `job` into the arena and write it on the thread (after the save in flight)."""
        self.wait()  # the arena is refilled only once the previous save is written
        plan = record_plan(job, self._arena, retention, memory_tier=self.memory_tier)
        arena = self._arena
        self.submit(lambda: write_plan(plan, arena))

    def release(self) -> None:
        """Free the arena (after `wait`); a later save allocates it again."""
        self._join()
        self._arena.close()


class ProcessWriter:
    """One long-lived writer process and the shared memory it reads; one save in flight at a time."""

    out_of_process = True
    records_plan = True

    def __init__(self) -> None:
        self.pause_s = 0.0  # tests only: the writer sleeps after each file
        self.memory_tier = False  # the writer also copies each commit to shared memory (set by the manager)
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._arena: SharedArena | None = None
        self._in_flight: int | None = None  # the step being written
        register_writer(self)
        self._start()  # now, so its imports overlap with training instead of delaying the first save

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def snapshot_bytes(self) -> int:
        """Shared memory held for snapshots: about one save's bytes, reused from save to save."""
        return self._arena.nbytes if self._arena is not None else 0

    @property
    def busy(self) -> bool:
        """True while a save is being written."""
        return self._in_flight is not None and self._conn is not None and not self._conn.poll()

    def submit_job(self, job: SaveJob, retention: RetentionPolicy) -> None:
        """Snapshot `job` into shared memory and hand it to the writer (after the save in flight)."""
        self.wait()
        if self._proc is None:
            self._start()
        assert self._conn is not None and self._arena is not None
        plan = record_plan(job, self._arena, retention, pause_s=self.pause_s, memory_tier=self.memory_tier)
        self._conn.send(("save", plan))
        self._in_flight = plan.step

    def wait(self) -> None:
        """Block until the save in flight is committed; raise its error, once, if it failed."""
        if self._in_flight is None:
            return
        step, self._in_flight = self._in_flight, None
        reply = self._receive(f"writing the checkpoint of step {step}")
        if reply[0] == "error":
            _, kind, message, trace = reply
            raise BackgroundSaveError(
                f"the background save of step {step} failed in the writer process: {kind}: {message}. "
                "Nothing was committed for that step; earlier checkpoints are intact. "
                "Fix the cause (see the writer's traceback in .remote_traceback) and save again.",
                remote_traceback=trace,
            )

    def close(self) -> None:
        """Wait for the save in flight, then stop the writer process and free the shared memory."""
        try:
            self.wait()
        finally:
            self._stop()

    def finish(self, reason: str) -> None:
        """Exit paths: wait for the save in flight without raising, report its error, stop."""
        announce_finish(self.busy, reason)
        try:
            self.close()
        except SavepointError as exc:
            print(f"savepoint: a background save failed before {reason}: {exc}", file=sys.stderr, flush=True)

    def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # The child imports savepoint from wherever this process did.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        with theirs:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "savepoint.writer_process", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # no Ctrl-C or process-group signal meant for the trainer
            )
        self._conn = Connection(ours.detach())
        self._arena = SharedArena(self._share_segment, on_drop=self._drop_segments)

    def _share_segment(self, fd: int, size: int) -> None:
        assert self._conn is not None and self._proc is not None
        self._conn.send(("segment", size))
        # Queued on the socket, not waited for: the first save need not wait for the writer to boot.
        send_handle(self._conn, fd, self._proc.pid)

    def _drop_segments(self) -> None:
        assert self._conn is not None
        self._conn.send(("drop",))  # the writer is idle (the save in flight was waited for): it unmaps them

    def _receive(self, what: str) -> tuple[Any, ...]:
        assert self._conn is not None and self._proc is not None
        try:
            reply: tuple[Any, ...] = self._conn.recv()
            return reply
        except (EOFError, OSError) as exc:
            pid = self._proc.pid
            try:
                code: int | None = self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                code = None
            self._stop()  # the next save starts a fresh writer
            raise BackgroundSaveError(
                f"the savepoint writer process (pid {pid}) ended (exit status {code}) while {what}; "
                "that checkpoint was not committed and earlier ones are intact. The next save starts a new "
                "writer; if this repeats, look for the OOM killer or a signal sent to the writer."
            ) from exc

    def _stop(self) -> None:
        if self._conn is not None:
            self._conn.close()  # EOF: the writer exits once it is idle
        if self._proc is not None:
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._arena is not None:
            self._arena.close()
        self._conn = self._proc = self._arena = None
        self._in_flight = None
