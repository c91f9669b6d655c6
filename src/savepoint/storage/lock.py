"""One writer per root: an advisory lock on ROOT/.savepoint.lock, released by the kernel if we die.

`flock` locks belong to the open file, so a crashed holder can never block a root forever (no stale
lock to clean). The file also names the holder (pid, host) so the refusal can say who it is.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time

from savepoint.errors import LockedRootError
from savepoint.storage.local import storage_error

LOCK_NAME = ".savepoint.lock"


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
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
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
