"""Opening files that someone else may have made: no symlinks, regular files only, sizes checked first.

A checkpoint, a base model or an adapter directory may come from an attacker who controls every byte
(DESIGN.md, promise 4). Checks on a path string race with the file system, so every component below
the trusted directory is opened with `openat(..., O_NOFOLLOW)` relative to its parent's descriptor, and
the final file is checked with `fstat` on the open descriptor. The final open uses `O_NONBLOCK`, so a
FIFO planted in place of a file is refused instead of blocking forever.

    >>> with open_inside("runs/exp1/step-00000100", "train_state/extra.json", max_bytes=1 << 20) as f:
    ...     raw = f.read()  # doctest: +SKIP
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
from collections.abc import Callable, Iterator
from typing import BinaryIO

from savepoint.errors import CorruptCheckpointError, Problem, UnsafeCheckpointError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def split_relpath(relpath: str, where: str) -> list[str]:
    """The components of a relative path; refuse absolute paths, `..`, empty parts and NUL bytes."""
    parts = relpath.replace("\\", "/").split("/")
    if not relpath or relpath.startswith(("/", "\\")) or (len(relpath) > 1 and relpath[1] == ":"):
        raise UnsafeCheckpointError(where, [Problem(relpath, "absolute path; files must lie inside")])
    if any(p in ("..", "", ".") for p in parts) or "\x00" in relpath:
        raise UnsafeCheckpointError(where, [Problem(relpath, "path climbs out of its directory")])
    return parts


def open_dir_inside(root: str, parts: list[str], relpath: str) -> int:
    """A descriptor of the directory `root/parts...`, following no symlink below `root`."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in parts:
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafeCheckpointError(
                        root,
                        [Problem(relpath, f"{name!r} on its path is a symbolic link or not a directory")],
                    ) from exc
                raise
            os.close(fd)
            fd = child
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_fd_inside(root: str, relpath: str, *, max_bytes: int | None = None) -> tuple[int, int]:
    """(descriptor, size) of the regular file `root/relpath`, opened without following any symlink.

    Raises UnsafeCheckpointError for a symlink or a non-regular file anywhere below `root`,
    CorruptCheckpointError when the file is larger than `max_bytes`, and the plain OSError
    (FileNotFoundError, PermissionError, ...) otherwise, so callers keep their own "missing" wording.
    """
    parts = split_relpath(relpath, root)
    dir_fd = open_dir_inside(root, parts[:-1], relpath)
    try:
        try:
            fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            blob_fd = open_hub_cache_blob(root, parts, dir_fd) if exc.errno == errno.ELOOP else None
            if blob_fd is not None:
                fd = blob_fd
            elif exc.errno == errno.ELOOP:
                raise UnsafeCheckpointError(root, [Problem(relpath, "is a symbolic link")]) from exc
            elif exc.errno in (errno.ENXIO, errno.EISDIR):
                raise UnsafeCheckpointError(root, [Problem(relpath, "is not a regular file")]) from exc
            else:
                raise
    finally:
        os.close(dir_fd)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeCheckpointError(
                root, [Problem(relpath, "is not a regular file (a FIFO, device, socket or directory)")]
            )
        if max_bytes is not None and info.st_size > max_bytes:
            raise CorruptCheckpointError(
                root, [Problem(relpath, f"is {info.st_size} bytes, more than the {max_bytes} allowed")]
            )
        # Reads should block normally now that we know this is a regular file.
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return fd, info.st_size
    except BaseException:
        os.close(fd)
        raise


# The Hugging Face cache stores a snapshot's files as links `../../blobs/<sha>` into its repo folder:
# `models--org--name/snapshots/<rev>/config.json -> ../../blobs/<sha>`. That one shape is followed,
# and only into that repo folder's own `blobs/` directory, itself opened without following links.
_HUB_BLOB_NAME = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


def open_hub_cache_blob(root: str, parts: list[str], dir_fd: int) -> int | None:
    """The blob behind a Hugging Face cache link `root/parts`, or None when it is any other link."""
    snapshot = os.path.abspath(root)
    snapshots_dir, repo_dir = os.path.dirname(snapshot), os.path.dirname(os.path.dirname(snapshot))
    if os.path.basename(snapshots_dir) != "snapshots" or not os.path.basename(repo_dir).startswith(
        ("models--", "datasets--", "spaces--")
    ):
        return None
    try:
        target = os.readlink(parts[-1], dir_fd=dir_fd)
    except OSError:
        return None
    up, _, blob = target.rpartition("blobs/")
    if up != "../" * (len(parts) + 1) or not _HUB_BLOB_NAME.fullmatch(blob):
        return None
    blobs_fd = open_dir_inside(repo_dir, ["blobs"], "/".join(parts))
    try:
        return os.open(blob, _FILE_FLAGS, dir_fd=blobs_fd)
    except OSError:
        return None
    finally:
        os.close(blobs_fd)


def open_inside(root: str, relpath: str, *, max_bytes: int | None = None) -> BinaryIO:
    """`open_fd_inside` as an unbuffered binary file object (close it, or use it in `with`)."""
    fd, _ = open_fd_inside(root, relpath, max_bytes=max_bytes)
    return os.fdopen(fd, "rb", buffering=0)


def read_bytes_inside(root: str, relpath: str, *, max_bytes: int) -> bytes:
    """The whole content of a small regular file below `root`, capped at `max_bytes`."""
    fd, _ = open_fd_inside(root, relpath, max_bytes=max_bytes)
    try:
        chunks = []
        remaining = max_bytes + 1  # a file that grows after fstat is still capped
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise CorruptCheckpointError(root, [Problem(relpath, f"grew past {max_bytes} bytes while read")])
    return data


# ---------------------------------------------------------------- listing


FILE, DIRECTORY, SYMLINK, OTHER = "file", "directory", "symlink", "other"
MAX_DEPTH = 32  # savepoint writes at most 4 levels; HF model directories a few more
MAX_ENTRIES = 1_000_000  # a listing is held in memory: bound it, whatever the directory claims


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return FILE
    if stat.S_ISDIR(mode):
        return DIRECTORY
    if stat.S_ISLNK(mode):
        return SYMLINK
    return OTHER


def list_dir_inside(root: str, relpath: str = "") -> list[tuple[str, str]]:
    """(name, kind) of every entry of the directory `root/relpath`, sorted, without following symlinks.

    `kind` is FILE, DIRECTORY, SYMLINK or OTHER (FIFO, socket, device), from `lstat` relative to the
    directory's descriptor, so a symlink is reported as one and never followed.
    """
    parts = split_relpath(relpath, root) if relpath else []
    fd = open_dir_inside(root, parts, relpath)
    try:
        out: list[tuple[str, str]] = []
        with os.scandir(fd) as entries:
            for entry in entries:
                if len(out) >= MAX_ENTRIES:
                    raise CorruptCheckpointError(
                        root, [Problem(relpath or ".", f"holds more than {MAX_ENTRIES} entries")]
                    )
                try:
                    mode = entry.stat(follow_symlinks=False).st_mode
                except FileNotFoundError:
                    continue  # removed while listed
                out.append((entry.name, _kind(mode)))
        return sorted(out)
    finally:
        os.close(fd)


def walk_inside(
    root: str, relpath: str = "", *, max_depth: int = MAX_DEPTH, skip: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, str]]:
    """(relpath, kind) of every entry below `root/relpath`, depth first, directories before their contents.

    Symlinks are reported, never followed. Iterative, not recursive, so a hostile nesting depth
    cannot exhaust the stack; deeper than `max_depth` levels is an UnsafeCheckpointError. `skip(rel)`
    prunes a directory (it is still reported).
    """
    pending = [relpath]
    while pending:
        current = pending.pop()
        depth = current.count("/") + 1 if current else 0
        children = []
        try:
            entries = list_dir_inside(root, current)
        except OSError as exc:
            if current == relpath:
                raise  # the starting directory: the caller words "missing" or "unreadable" itself
            raise CorruptCheckpointError(
                root, [Problem(current, f"unreadable ({exc.strerror or exc})")]
            ) from exc
        for name, kind in entries:
            rel = f"{current}/{name}" if current else name
            yield rel, kind
            if kind == DIRECTORY and not (skip and skip(rel)):
                if depth + 1 > max_depth:
                    raise UnsafeCheckpointError(
                        root, [Problem(rel, f"directories nest deeper than {max_depth} levels")]
                    )
                children.append(rel)
        pending.extend(reversed(children))
