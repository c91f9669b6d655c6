"""The one temporary directory every rank of a save writes into, and the proof that all of them see it.

Rank 0 creates it (its name is broadcast), writes a nonce file into it, and every rank reads that file
back before anyone writes a byte: two nodes with the same root path on separate local disks would
otherwise each write into their own copy, and rank 0 would commit a manifest listing files that are
not there. At world size 1 the same steps run, with no peer to ask, and rank 0's files that equal the
parent checkpoint's are hard-linked to them (`DedupingStagedDir`).
"""

from __future__ import annotations

import functools
import os
import secrets
import time
from collections.abc import Iterator
from contextlib import suppress

from savepoint import distributed
from savepoint.distributed import DistributedSaveError, agree, rank
from savepoint.errors import SavepointError
from savepoint.formats.train_state import TRAIN_STATE_DIR
from savepoint.io.files import read_bytes_inside
from savepoint.storage.dedupe import DedupingStagedDir
from savepoint.storage.remote import staged_for
from savepoint.storage.remote_ranks import RemoteStagedDir, open_remote_staged

ROOT_CHECK_NAME = ".savepoint-root-check"  # rank 0's proof that every rank sees its temp dir; never committed


class SharedStagedDir(DedupingStagedDir):
    """The temporary directory every rank writes into: rank 0 creates and commits it, the others join it
    (and link nothing: `previous` is rank 0's alone)."""

    others_files: frozenset[str] = frozenset()  # relpaths other ranks reported (set by commit.take_reports)

    @classmethod
    def join(cls, parent: str, final_name: str, path: str) -> SharedStagedDir:
        staged = cls.__new__(cls)
        staged.parent, staged.final_name, staged.path, staged.entries = parent, final_name, path, {}
        staged.previous, staged.linked = None, {}
        return staged

    def record_unlisted(self) -> None:
        # Other ranks write train_state/ at the same time; each records its own files there.
        for dirpath, dirs, files in os.walk(self.path):
            if dirpath == self.path and TRAIN_STATE_DIR in dirs:
                dirs.remove(TRAIN_STATE_DIR)
            for name in files:
                rel = os.path.relpath(os.path.join(dirpath, name), self.path).replace(os.sep, "/")
                if rel not in self.entries:
                    self.record(rel)

    def dirs_to_sync(self) -> Iterator[str]:
        """Rank 0 skips a directory that holds only other ranks' files: they fsynced it before reporting
        (`commit.sync_own_dirs`), so the commit makes O(1) directory syncs, not one per rank's directory."""
        for dirpath, dirs, files in os.walk(self.path):
            rels = (os.path.relpath(os.path.join(dirpath, n), self.path).replace(os.sep, "/") for n in files)
            if dirs or not files or not all(rel in self.others_files for rel in rels):
                yield dirpath


def open_staged(
    parent: str, final_name: str, *, previous: str | None = None, timeout: float | None, what: str
) -> SharedStagedDir | RemoteStagedDir:
    """Rank 0 creates the temp dir; every rank proves it sees it before anyone writes a byte. `previous`:
    the parent checkpoint rank 0's unchanged files are hard-linked to."""
    # An object-store root under torchrun: each rank stages on its own disk and uploads its part. In a
    # plain process the manager uploads the committed checkpoint (storage/remote.py).
    remote = staged_for(parent) if distributed.is_distributed() else None
    if remote is not None:
        vote = functools.partial(agree, timeout=timeout, what=what)
        return open_remote_staged(remote, parent, final_name, rank=rank(), vote=vote)
    opened, error, staged0 = None, None, None
    if rank() == 0:
        try:
            staged0 = SharedStagedDir(parent, final_name, previous=previous)
            opened = (os.path.basename(staged0.path), secrets.token_hex(16))
            staged0.write_bytes(ROOT_CHECK_NAME, opened[1].encode())
            del staged0.entries[ROOT_CHECK_NAME]
        except BaseException as exc:
            error = exc
    try:
        name, nonce = agree(error, opened, timeout=timeout, what=what)[0]
    except BaseException:
        if opened is not None:
            SharedStagedDir.join(parent, final_name, os.path.join(parent, opened[0])).abort()
        raise
    # Each rank joins under its own root string: the temp dir's name is all rank 0 tells it.
    path = os.path.join(parent, name)
    staged = staged0 if staged0 is not None else SharedStagedDir.join(parent, final_name, path)
    error = None
    try:
        _check_sees(parent, path, nonce, timeout)
    except BaseException as exc:
        error = exc
    try:
        agree(error, timeout=timeout, what=what)
    except BaseException:
        if rank() == 0:
            staged.abort()
        raise
    if rank() == 0:  # everybody has read it: it must not be committed (`commit` tries again)
        with suppress(OSError):
            os.remove(staged.abspath(ROOT_CHECK_NAME))
    return staged


def _check_sees(root: str, path: str, nonce: str, timeout: float | None) -> None:
    """Read back rank 0's nonce file, retrying briefly: a shared filesystem's attribute cache may lag."""
    deadline = time.monotonic() + min(5.0, float(timeout or distributed.DEFAULT_TIMEOUT) / 4)
    while True:
        try:
            seen = read_bytes_inside(path, ROOT_CHECK_NAME, max_bytes=1024).decode(errors="replace")
            problem = None if seen == nonce else f"it holds {seen[:40]!r}, not what rank 0 wrote"
        except (OSError, SavepointError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        if problem is None:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    raise DistributedSaveError(
        f"rank {rank()} does not see the file rank 0 wrote in {path} ({problem}): the checkpoint root {root} "
        "is not one directory shared by every rank (e.g. each node has its own local disk under the same "
        "path), so rank 0 cannot commit the other ranks' files. Use a root every rank sees: a shared "
        "filesystem (NFS, Lustre, a mounted bucket) or an object-store root (s3://...); nothing was committed."
    )
