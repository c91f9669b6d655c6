"""A fault-injection shim for the file-system calls a save makes.

`install(plan)` wraps, in the current process, every call savepoint (and the libraries it calls
from Python: transformers' config and tokenizer writers, `shutil.rmtree`) uses to change a file
system: `open` in a writing mode (create), writes and flushes on the file objects it returns,
`os.open` with O_CREAT/O_WRONLY/O_RDWR, `os.write`, `os.ftruncate`, `os.fsync`, `os.fdatasync`,
`os.rename`, `os.replace`, `os.mkdir` (which `os.makedirs` calls), `os.unlink`, `os.remove`,
`os.rmdir` (which `shutil.rmtree` calls, with `dir_fd`), `os.link` and `os.symlink`.

Only operations on paths under `plan.root` count, numbered from 1 in the order they are attempted.
At operation `crash_at` the process ends with `os._exit(137)` *before* the operation runs (so the
first k-1 operations happened and nothing after them: what SIGKILL leaves behind). At the
`error_at`-th write, flush or fsync the call raises `OSError(plan.errno)` instead (and every later
one too when `sticky`, as a full disk does).

Every attempted operation is appended to `plan.trace` (JSON lines, written with the unwrapped
`os.write` so a crash loses nothing) for the harness to replay. Writes made by Rust code (the
tokenizers library writing tokenizer.json) are invisible to this shim; everything savepoint writes
itself is seen.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import threading
from dataclasses import asdict, dataclass
from typing import Any

CRASH_EXIT_CODE = 137
# Kinds where an injected I/O error makes sense (the data path); the rest are namespace changes.
ERROR_KINDS = frozenset({"write", "flush", "fsync"})
_WRITE_FLAGS = os.O_CREAT | os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND


@dataclass
class FaultPlan:
    """What to inject. Without `crash_at` and `error_at` the shim only traces."""

    root: str
    trace: str | None = None
    crash_at: int | None = None
    error_at: int | None = None
    errno: int | None = None
    sticky: bool = True

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_real: dict[str, Any] = {}
_state: dict[str, Any] = {}
_lock = threading.RLock()


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def _full(path: Any, dir_fd: int | None = None) -> str:
    if isinstance(path, int):
        return _fd_path(path)
    path = os.fsdecode(os.fspath(path))
    if dir_fd is not None and not os.path.isabs(path):
        return os.path.join(_fd_path(dir_fd), path)
    return os.path.abspath(path)


def _under_root(path: str) -> bool:
    root = _state["root"]
    return path == root or path.startswith(root + os.sep)


def _hit(kind: str, path: str, dst: str = "") -> None:
    """Count one operation on `path`; crash or raise if the plan says this is the one."""
    if not _under_root(path) and not (dst and _under_root(dst)):
        return
    plan: FaultPlan = _state["plan"]
    with _lock:
        _state["ops"] += 1
        n = _state["ops"]
        fail = False
        if kind in ERROR_KINDS and plan.error_at is not None:
            _state["data_ops"] += 1
            d = _state["data_ops"]
            fail = d == plan.error_at or (plan.sticky and d > plan.error_at)
        if _state["trace_fd"] is not None:
            rel = os.path.relpath(path, _state["root"])
            line = {
                "i": n,
                "kind": kind,
                "path": rel,
                "dst": os.path.relpath(dst, _state["root"]) if dst else "",
            }
            line["fail"] = fail
            _real["write"](_state["trace_fd"], (json.dumps(line) + "\n").encode())
        if plan.crash_at is not None and n >= plan.crash_at:
            os._exit(CRASH_EXIT_CODE)
    if fail:
        raise OSError(plan.errno, os.strerror(plan.errno or 0), path)


class TrackedFile:
    """A writable file object whose writes and flushes are counted operations."""

    def __init__(self, f: Any, path: str) -> None:
        self._f = f
        self._path = path

    def write(self, data: Any) -> int:
        _hit("write", self._path)
        return self._f.write(data)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        _hit("flush", self._path)
        self._f.flush()

    def __enter__(self) -> TrackedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()

    def __iter__(self) -> Any:
        return iter(self._f)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def _open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
    writing = any(c in mode for c in "wax+")
    path = _full(file) if writing and not isinstance(file, int) else ""
    if path and _under_root(path):
        _hit("create", path)
        return TrackedFile(_real["open"](file, mode, *args, **kwargs), path)
    return _real["open"](file, mode, *args, **kwargs)


def _os_open(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
    if flags & _WRITE_FLAGS:
        _hit("create", _full(path, dir_fd))
    return _real["os_open"](path, flags, mode, dir_fd=dir_fd)


def _fd_op(kind: str, name: str) -> Any:
    def wrapper(fd: int, *args: Any) -> Any:
        _hit(kind, _fd_path(fd))
        return _real[name](fd, *args)

    return wrapper


def _path_op(kind: str, name: str) -> Any:
    def wrapper(path: Any, *args: Any, dir_fd: int | None = None, **kwargs: Any) -> Any:
        _hit(kind, _full(path, dir_fd))
        if dir_fd is not None:
            kwargs["dir_fd"] = dir_fd
        return _real[name](path, *args, **kwargs)

    return wrapper


def _two_path_op(kind: str, name: str) -> Any:
    def wrapper(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
        src_dir, dst_dir = kwargs.get("src_dir_fd"), kwargs.get("dst_dir_fd")
        _hit(kind, _full(src, src_dir), _full(dst, dst_dir))
        return _real[name](src, dst, *args, **kwargs)

    return wrapper


_OS_WRAPPERS = {
    "write": lambda: _fd_op("write", "write"),
    "ftruncate": lambda: _fd_op("truncate", "ftruncate"),
    "fsync": lambda: _fd_op("fsync", "fsync"),
    "fdatasync": lambda: _fd_op("fsync", "fdatasync"),
    "mkdir": lambda: _path_op("mkdir", "mkdir"),
    "unlink": lambda: _path_op("unlink", "unlink"),
    "remove": lambda: _path_op("unlink", "remove"),
    "rmdir": lambda: _path_op("rmdir", "rmdir"),
    "rename": lambda: _two_path_op("rename", "rename"),
    "replace": lambda: _two_path_op("rename", "replace"),
    "link": lambda: _two_path_op("link", "link"),
    "symlink": lambda: _two_path_op("link", "symlink"),
}


def install(plan: FaultPlan) -> None:
    """Start counting (and injecting) in this process. Call `uninstall()` to stop."""
    if _real:
        raise RuntimeError("the fault shim is already installed")
    _real["open"] = builtins.open
    _real["os_open"] = os.open
    for name in _OS_WRAPPERS:
        _real[name] = getattr(os, name)
    trace_fd = None
    if plan.trace:
        trace_fd = os.open(plan.trace, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    _state.update(plan=plan, root=os.path.abspath(plan.root), ops=0, data_ops=0, trace_fd=trace_fd)
    builtins.open = io.open = _open  # type: ignore[assignment]
    os.open = _os_open  # type: ignore[assignment]
    for name, make in _OS_WRAPPERS.items():
        setattr(os, name, make())


def uninstall() -> dict[str, int]:
    """Restore the real calls; return how many operations (and data operations) were counted."""
    if not _real:
        return {"ops": 0, "data_ops": 0}
    builtins.open = io.open = _real.pop("open")
    os.open = _real.pop("os_open")
    for name in list(_real):
        setattr(os, name, _real.pop(name))
    if _state.get("trace_fd") is not None:
        os.close(_state["trace_fd"])
    return {"ops": _state["ops"], "data_ops": _state["data_ops"]}


def read_trace(path: str) -> list[dict[str, Any]]:
    """The operations a traced run attempted, in order (the last one may be the one it died at)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
