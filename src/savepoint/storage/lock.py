"""One writer per root: an advisory lock on ROOT/.savepoint.lock, released by the kernel if we die.

`flock` locks belong to the open file, so a crashed holder can never block a root forever (no stale
lock to clean). The file also names the holder (pid, host) so the refusal can say who it is.

The root may come from someone else (DESIGN.md, promise 4), so the lock file is opened relative to the
root's descriptor with `O_NOFOLLOW` (a planted symlink is refused, never followed), and an existing
file is rewritten only when it is what savepoint leaves there: a regular file of ours with one link
and at most a holder record's size. Anything else is refused, never truncated.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import time

from savepoint.errors import LockedRootError, Problem, UnsafeCheckpointError
from savepoint.storage.local import storage_error

LOCK_NAME = ".savepoint.lock"
_MAX_HOLDER_BYTES = 4096
_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class RootLock:
    def __init__(self, root: str) -> None:
        self.path = os.path.join(root, LOCK_NAME)
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            self._acquire()
        except OSError as exc:
            raise storage_error(exc, self.path, "locking") from exc

    def _acquire(self) -> None:
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise LockedRootError(
                f"{os.path.dirname(self.path)} is already open for writing by {holder}; two writers would delete "
                "each other's saves. Stop that process, or give this run its own root."
            ) from None
        try:
            os.ftruncate(fd, 0)
            info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
            os.write(fd, json.dumps(info).encode())
        except OSError:
            os.close(fd)  # closing releases the flock too
            raise
        self._fd = fd

    def _open(self) -> int:
        """The lock file's descriptor: created by us, or an existing one that is safe to rewrite."""
        root_fd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                return os.open(LOCK_NAME, _FLAGS | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=root_fd)
            except FileExistsError:
                pass
            try:
                fd = os.open(LOCK_NAME, _FLAGS, dir_fd=root_fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
                    raise self._refuse("is a symbolic link or not a regular file") from exc
                raise
        finally:
            os.close(root_fd)
        try:
            reason = _unsafe_reason(fd)
            if reason:
                raise self._refuse(reason)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _refuse(self, reason: str) -> UnsafeCheckpointError:
        return UnsafeCheckpointError(
            os.path.dirname(self.path),
            [Problem(LOCK_NAME, f"{reason}; savepoint will not write through it")],
            hint=f"remove {self.path} if you trust this root (savepoint recreates it), or use another root",
        )

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"process {info.get('pid', '?')} on {info.get('host', '?')}"
    except (OSError, ValueError):
        return "another process"


def _unsafe_reason(fd: int) -> str | None:
    """Why an existing lock file must not be rewritten (None when it can only be one savepoint left).

    Its content is not judged (a holder killed mid-write leaves any prefix of its record); its identity
    is: a regular file of this user with one link and at most a holder record's size. Truncating such
    a file destroys nothing but itself, while a second link could be the name of a file elsewhere.
    """
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file"
    if info.st_nlink != 1:
        return f"has {info.st_nlink} hard links (it may be another file's name too)"
    if info.st_uid != os.geteuid():
        return "belongs to another user"
    if info.st_size > _MAX_HOLDER_BYTES:
        return f"is {info.st_size} bytes, not a lock file savepoint wrote"
    return None
