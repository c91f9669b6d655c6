"""Atomic directory commit on a local (POSIX) file system.

On-disk states of one save, and what a reader sees in each:

    ROOT/.tmp-step-00000042-1f3a/...      being written: readers ignore it, a manager sweeps it
    ROOT/.tmp-step-00000042-1f3a/savepoint.json   manifest written and fsynced, still invisible
    ROOT/step-00000042/                   renamed: committed, the only state readers list

Deletion runs the other way: the committed directory is first renamed to `.del-...` (one atomic
step after which it no longer lists), then removed at leisure. A crash in between leaves only a
`.del-` directory, which the next sweep removes.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import secrets
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import BinaryIO

from savepoint._hashing import hash_file, new_hasher
from savepoint.errors import SavepointError, StorageError
from savepoint.io.direct import DirectFile, OverlappedWriter, open_for_write

MANIFEST_NAME = "savepoint.json"
TMP_PREFIX = ".tmp-"
DELETE_PREFIX = ".del-"
REPLACED_PREFIX = ".old-"

_WRITEBACK_EVERY = 32 * 1024 * 1024
_DISK_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EIO: "I/O error",
}


def storage_error(exc: OSError, path: str, action: str) -> StorageError:
    """Turn an OSError into a StorageError that names the path and suggests a fix."""
    what = _DISK_ERRNOS.get(exc.errno or 0, exc.strerror or str(exc))
    fix = {
        errno.ENOSPC: "free space or point the manager at a larger volume",
        errno.EDQUOT: "free space or raise the quota",
        errno.EACCES: "check the directory's permissions",
        errno.EROFS: "the file system is read-only; choose a writable root",
    }.get(exc.errno or 0, "check the storage and try again")
    # Name the file or directory the call failed on too, when it is not `path` itself (a directory
    # fsync inside a commit, say): "where" is half of what the user needs.
    at = f" at {os.fsdecode(exc.filename)}" if exc.filename and os.fsdecode(exc.filename) != path else ""
    return StorageError(
        f"{action} {path} failed{at}: {what} (errno {exc.errno}); {fix}. Earlier checkpoints are intact."
    )


def fsync_dir(path: str) -> None:
    """Make a directory's entries (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:
        exc.filename = exc.filename or path  # the kernel's error does not say which directory
        raise
    finally:
        os.close(fd)


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing a range of `fd` to disk now, without waiting (Linux only).

    Otherwise dirty pages wait in the page cache for fsync, and the disk idles while we copy and
    hash: writing and flushing would run one after the other instead of overlapping.
    """
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


class HashingWriter:
    """A binary file that hashes and counts every byte written, and fsyncs on close."""

    def __init__(self, f: BinaryIO | DirectFile | OverlappedWriter) -> None:
        self._f = f
        self._kick = not getattr(f, "direct", False)  # O_DIRECT leaves no dirty pages to start on
        self._hasher = new_hasher()
        self.size = 0
        self._kicked = 0  # bytes already handed to start_writeback

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._hasher.update(data)
        self._f.write(data)
        nbytes = memoryview(data).nbytes
        self.size += nbytes
        if self._kick and self.size - self._kicked >= _WRITEBACK_EVERY:
            self._f.flush()
            start_writeback(self._f.fileno(), self._kicked, self.size - self._kicked)
            self._kicked = self.size
        return nbytes

    def digest(self) -> str:
        return self._hasher.hexdigest()


class StagedDir:
    """A directory written under a temporary name next to its final place, committed by one rename.

    Files are written with `create()` (hashed while written) or by another library straight into
    `path` and then registered with `record()`. `commit()` writes the manifest last and renames.
    """

    def __init__(self, parent: str, final_name: str) -> None:
        self.parent = parent
        self.final_name = final_name
        self.path = os.path.join(parent, f"{TMP_PREFIX}{final_name}-{secrets.token_hex(4)}")
        self.entries: dict[str, tuple[int, str]] = {}
        try:
            os.makedirs(parent, exist_ok=True)
            os.mkdir(self.path)
        except OSError as exc:
            raise storage_error(exc, self.path, "creating") from exc

    def abspath(self, relpath: str) -> str:
        return os.path.join(self.path, relpath)

    @contextmanager
    def create(self, relpath: str, *, direct: bool = False) -> Iterator[HashingWriter]:
        """Open `relpath` for writing; on exit it is fsynced and its size and checksum recorded.

        `direct=True` writes around the page cache (`savepoint.io.direct`): for large streamed files."""
        full = self.abspath(relpath)
        try:
            os.makedirs(os.path.dirname(full), exist_ok=True)
            # O_DIRECT for the async writers (inside `direct_writes()`) and for large streamed outputs.
            with open_for_write(full, direct=direct) as f:
                target = OverlappedWriter(f) if direct else f
                try:
                    writer = HashingWriter(target)
                    yield writer
                    if isinstance(target, OverlappedWriter):
                        target.finish()
                finally:
                    if isinstance(target, OverlappedWriter):
                        target.close()
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise storage_error(exc, full, "writing") from exc
        self.entries[relpath] = (writer.size, writer.digest())

    def write_bytes(self, relpath: str, data: bytes) -> None:
        with self.create(relpath) as w:
            w.write(data)

    def record(self, relpath: str) -> None:
        """Register (fsync and hash) a file that another library wrote into this directory."""
        full = self.abspath(relpath)
        try:
            fd = os.open(full, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self.entries[relpath] = hash_file(full)
        except OSError as exc:
            raise storage_error(exc, full, "recording") from exc

    def dirs_to_sync(self) -> Iterator[str]:
        """The directories `commit()` fsyncs: all of them (each holds entries made since it was created)."""
        for dirpath, _dirs, _files in os.walk(self.path):
            yield dirpath

    def record_unlisted(self) -> None:
        """Register every file present that was not written through `create()`."""
        self.record_unlisted_outside("", ignore=frozenset())

    def record_unlisted_outside(self, shared: str, *, ignore: frozenset[str]) -> list[str]:
        """Register (hash) the files present but not recorded, except those under directory `shared`
        (where other writers put files they record themselves) and the names in `ignore`; return the
        unrecorded files found under `shared`, sorted, for the caller to refuse. `shared=""`: none."""
        strays = []
        for dirpath, _dirs, files in os.walk(self.path):
            for name in files:
                rel = os.path.relpath(os.path.join(dirpath, name), self.path).replace(os.sep, "/")
                if rel in self.entries or rel in ignore:
                    continue
                if shared and rel.startswith(shared + "/"):
                    strays.append(rel)
                else:
                    self.record(rel)
        return sorted(strays)

    def commit(self, manifest_bytes: bytes, *, replace: bool = False) -> str:
        """Write the manifest last, make everything durable, and rename into place."""
        final = os.path.join(self.parent, self.final_name)
        try:
            with open(self.abspath(MANIFEST_NAME), "wb") as f:
                f.write(manifest_bytes)
                f.flush()
                os.fsync(f.fileno())
            for dirpath in self.dirs_to_sync():
                fsync_dir(dirpath)
            if os.path.lexists(final):
                if not replace:
                    raise SavepointError(
                        f"{final} already exists; savepoint never overwrites a committed checkpoint. "
                        "Save under another step, or delete the old one first."
                    )
                self._swap_into(final)
            else:
                os.rename(self.path, final)
                try:
                    fsync_dir(self.parent)
                except OSError:
                    # The rename may not be durable, and the caller is about to hear that the save
                    # failed: take it back, so that a failed save never leaves a listed checkpoint.
                    _quietly(os.rename, final, self.path)
                    raise
        except OSError as exc:
            raise storage_error(exc, final, "committing") from exc
        return final

    def _swap_into(self, final: str) -> None:
        if _exchange(self.path, final):
            # One atomic step: `final` now holds the new checkpoint and our temp name the old one, so
            # `final` lists at every instant (a crash leaves only a `.tmp-` directory for the sweep).
            try:
                fsync_dir(self.parent)
            except OSError:
                _quietly(_exchange, self.path, final)  # the save fails: the old checkpoint goes back
                raise
            shutil.rmtree(self.path, ignore_errors=True)
            return
        # Without RENAME_EXCHANGE there is no atomic "replace a non-empty directory" on POSIX: move the
        # old one aside first. A crash between the two renames leaves only `.old-NAME-x`, which the
        # sweep puts back (until then readers do not list NAME: tests/reliability found this window).
        aside = os.path.join(self.parent, f"{REPLACED_PREFIX}{self.final_name}-{secrets.token_hex(4)}")
        os.rename(final, aside)
        os.rename(self.path, final)
        fsync_dir(self.parent)
        shutil.rmtree(aside, ignore_errors=True)

    def abort(self) -> None:
        """Remove everything written so far. Never raises: it runs while another error propagates."""
        shutil.rmtree(self.path, ignore_errors=True)


def _quietly(undo: Callable[..., object], *args: str) -> None:
    """Best-effort rollback while another error propagates (that error is the one to report)."""
    with suppress(OSError):
        undo(*args)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: str, b: str) -> bool:
    """Swap two directory entries atomically (Linux `renameat2(RENAME_EXCHANGE)`).

    Returns False where the kernel, file system or libc cannot (the caller falls back to two
    renames); other failures raise OSError like `os.rename` does.
    """
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), a, None, b)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def delete_checkpoint_dir(path: str) -> None:
    """Delete a committed directory so that it stops listing in one atomic step."""
    parent, name = os.path.split(path.rstrip("/"))
    aside = os.path.join(parent, f"{DELETE_PREFIX}{name}-{secrets.token_hex(4)}")
    os.rename(path, aside)
    fsync_dir(parent)
    shutil.rmtree(aside, ignore_errors=True)


def sweep_stale(root: str) -> list[str]:
    """Remove what interrupted saves and deletions left behind. Returns the names removed."""
    removed: list[str] = []
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return removed
    for name in sorted(names):
        path = os.path.join(root, name)
        if name.startswith(REPLACED_PREFIX):
            original = name[len(REPLACED_PREFIX) :].rsplit("-", 1)[0]
            if not os.path.lexists(os.path.join(root, original)):
                try:
                    os.rename(
                        path, os.path.join(root, original)
                    )  # the replacement never landed: keep the old
                    fsync_dir(root)
                except (
                    OSError
                ) as exc:  # a save that cannot sweep must fail as a StorageError, not a bare OSError
                    raise storage_error(exc, path, "putting back") from exc
                continue
        if name.startswith((TMP_PREFIX, DELETE_PREFIX, REPLACED_PREFIX)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    return removed
