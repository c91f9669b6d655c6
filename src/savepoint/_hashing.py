"""Content checksums: xxh3-128, computed while bytes are written and verified before they are read."""

from __future__ import annotations

import io
import os

import xxhash

from savepoint.io.files import open_inside

CHECKSUM_ALGORITHM = "xxh3_128"
_CHUNK = 16 * 1024 * 1024


def new_hasher() -> xxhash.xxh3_128:
    return xxhash.xxh3_128()


def hash_file(path: str | os.PathLike[str]) -> tuple[int, str]:
    """Return (size, hex digest) of a file, read in chunks so memory stays bounded."""
    hasher = new_hasher()
    size = 0
    with open(path, "rb", buffering=0) as f:
        size = _hash_stream(f, hasher)
    return size, hasher.hexdigest()


def hash_fd(fd: int) -> tuple[int, str]:
    """(size, hex digest) of the bytes of an open file from its current offset (the descriptor stays open)."""
    hasher = new_hasher()
    f = os.fdopen(fd, "rb", buffering=0, closefd=False)
    with f:
        size = _hash_stream(f, hasher)
    return size, hasher.hexdigest()


def hash_inside(root: str, relpath: str) -> tuple[int, str]:
    """`hash_file` for a file below `root` that someone else may have made: no symlink is followed and
    only a regular file is read (`savepoint.io.files`); the bytes hashed are the bytes of that open file."""
    hasher = new_hasher()
    with open_inside(root, relpath) as f:
        size = _hash_stream(f, hasher)  # type: ignore[arg-type]  # an unbuffered FileIO in fact
    return size, hasher.hexdigest()


def _hash_stream(f: io.RawIOBase, hasher: xxhash.xxh3_128) -> int:
    # A buffer no larger than the file: zero-filling 16 MiB for a 2 KB config costs more than hashing it.
    buf = bytearray(max(1, min(_CHUNK, os.fstat(f.fileno()).st_size + 1)))
    view = memoryview(buf)
    size = 0
    while True:
        n = f.readinto(view)
        if not n:
            return size
        hasher.update(view[:n])
        size += n
