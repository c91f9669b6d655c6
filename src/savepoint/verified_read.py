"""Reading checkpoint files once: every byte is hashed as it is read, and nothing built from a file is
handed on before the file's size and checksum match the manifest.

A restore used to checksum each file (a full read) and then read it again to load it. Here the one read
that loads a file also verifies it: `read_bytes_verified` for small files (JSON), and
`read_safetensors_verified` for weight files, whose header and tensors, read in file order with
`preadv`, tile the whole file. Damage is a CorruptCheckpointError naming the file, raised before the
caller sees any of its contents.

    >>> tensors = read_safetensors_verified(ckpt, manifest, "model.safetensors")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

from savepoint._hashing import new_hasher
from savepoint.errors import CorruptCheckpointError, Problem
from savepoint.io.files import open_fd_inside
from savepoint.io.safetensors import SafetensorsFile
from savepoint.manifest import FileEntry, Manifest, check_file, check_relpath

_CHUNK = 16 * 1024 * 1024


def _entry(ckpt_dir: str, manifest: Manifest, relpath: str) -> FileEntry:
    entry = manifest.files.get(relpath)
    if entry is None:
        raise CorruptCheckpointError(ckpt_dir, [Problem(relpath, "needed but not listed in the manifest")])
    check_relpath(relpath, ckpt_dir)
    return entry


def _open_checked(ckpt_dir: str, relpath: str, entry: FileEntry) -> int:
    """An open descriptor of `relpath` whose size matches its entry (no symlink followed, regular file)."""
    try:
        fd, size = open_fd_inside(ckpt_dir, relpath)
    except FileNotFoundError as exc:
        raise CorruptCheckpointError(ckpt_dir, [Problem(relpath, "missing")]) from exc
    except IsADirectoryError as exc:
        raise CorruptCheckpointError(ckpt_dir, [Problem(relpath, "a directory, not a file")]) from exc
    except OSError as exc:
        raise CorruptCheckpointError(
            ckpt_dir, [Problem(relpath, f"unreadable ({exc.strerror or exc})")]
        ) from exc
    if size != entry.size:
        os.close(fd)
        raise CorruptCheckpointError(
            ckpt_dir,
            [Problem(relpath, f"size {size} bytes, manifest says {entry.size} (truncated or overwritten)")],
        )
    return fd


def _mismatch(ckpt_dir: str, relpath: str, digest: str, entry: FileEntry) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        ckpt_dir, [Problem(relpath, f"checksum mismatch (xxh3-128 {digest}, manifest says {entry.checksum})")]
    )


def read_bytes_verified(
    ckpt_dir: str, manifest: Manifest, relpath: str, *, max_bytes: int | None = None
) -> bytes:
    """The whole of a listed file, checked against its manifest entry in the same read; a file listed
    as larger than `max_bytes` is refused unread."""
    entry = _entry(ckpt_dir, manifest, relpath)
    if max_bytes is not None and entry.size > max_bytes:
        raise CorruptCheckpointError(
            ckpt_dir,
            [Problem(relpath, f"{entry.size} bytes, more than the {max_bytes} such a file may hold")],
        )
    fd = _open_checked(ckpt_dir, relpath, entry)
    try:
        buf = bytearray(entry.size)
        view, done = memoryview(buf), 0
        while done < entry.size:
            n = os.preadv(fd, [view[done : done + _CHUNK]], done)
            if n == 0:
                break
            done += n
    except OSError as exc:
        raise CorruptCheckpointError(
            ckpt_dir, [Problem(relpath, f"unreadable ({exc.strerror or exc})")]
        ) from exc
    finally:
        os.close(fd)
    hasher = new_hasher()
    hasher.update(view[:done])
    if done != entry.size or hasher.hexdigest() != entry.checksum:
        raise _mismatch(ckpt_dir, relpath, hasher.hexdigest(), entry)
    return bytes(buf)


def read_safetensors_verified(ckpt_dir: str, manifest: Manifest, relpath: str) -> dict[str, torch.Tensor]:
    """Every tensor of a listed safetensors file, each in a buffer of its own, read once: the checksum
    is computed over the header and the tensors as they are read, in file order."""
    entry = _entry(ckpt_dir, manifest, relpath)
    fd = _open_checked(ckpt_dir, relpath, entry)
    hasher = new_hasher()
    try:
        with SafetensorsFile(fd, entry.size, ckpt_dir, relpath, on_read=hasher.update) as f:
            tensors = dict(iter(f))
    except (OSError, ValueError) as exc:
        raise CorruptCheckpointError(
            ckpt_dir, [Problem(relpath, f"not a readable safetensors file: {exc}")]
        ) from exc
    if hasher.hexdigest() != entry.checksum:
        raise _mismatch(ckpt_dir, relpath, hasher.hexdigest(), entry)
    return tensors


def verify_share(
    ckpt_dir: str,
    manifest: Manifest,
    relpaths: Iterable[str],
    *,
    rank: int,
    world_size: int,
    content: bool = True,
) -> None:
    """Check this rank's share of files: file i of the sorted list goes to rank i mod W, so each is
    checked once in the whole job. `content`: checksum them (a full read); else only that each is there,
    a regular file of its listed size (no read)."""
    mine = [p for i, p in enumerate(sorted(relpaths)) if i % world_size == rank]
    problems = []
    for rel in mine:
        entry = manifest.files[rel]
        if content:
            problem = check_file(ckpt_dir, rel, entry)
            if problem is not None:
                problems.append(problem)
            continue
        try:
            os.close(_open_checked(ckpt_dir, rel, entry))
        except CorruptCheckpointError as exc:
            problems.extend(exc.problems)
    if problems:
        raise CorruptCheckpointError(ckpt_dir, problems)
