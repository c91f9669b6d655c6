"""Content checksums: xxh3-128, computed while bytes are written and verified before they are read."""

from __future__ import annotations

import io
import os

import xxhash

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
