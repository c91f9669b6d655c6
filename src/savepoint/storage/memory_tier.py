"""Tier 0: the newest committed checkpoint of a root, kept in shared memory for a restart on this machine.

A training process that crashes and is restarted on the same machine restores from here instead of
the disk (or the object store). The copy lives in `/dev/shm/savepoint-<uid>/<root id>/step-N/`, a
directory only this user can enter, and holds one checkpoint: each newer commit replaces it.

The disk stays the trust anchor. A tier copy is used only when its manifest is byte-for-byte the
committed manifest of the same step on disk, and the restore then checks every file it reads against
that manifest, exactly as it does on disk. A copy that is partial (a crash while copying leaves no
manifest), stale or changed is simply not used.

An async writer that still holds the checkpoint's bytes in memory (writer_process.write_plan) passes
them to `publish`, which copies them from there instead of reading the just-written files back from
the disk; the manifest is always taken from the disk.

`CheckpointManager.close()` drops the tier: a clean exit needs no restart from memory. A process that
crashes leaves it for its successor; `drop(root)` removes one by hand.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import warnings
from collections.abc import Iterable, Mapping

from savepoint.errors import SavepointError
from savepoint.io.files import open_fd_inside, read_bytes_inside
from savepoint.manifest import MAX_MANIFEST_BYTES, manifest_bytes, read_manifest
from savepoint.storage.dedupe import copy_range
from savepoint.storage.local import MANIFEST_NAME
from savepoint.storage.remote import RemoteRoot

_BASE_ENV = "SAVEPOINT_MEMORY_TIER_DIR"  # tests and machines without /dev/shm point it elsewhere
_INCOMING = ".incoming"
_HEADROOM = 1.1  # leave the tmpfs some room: it is the machine's RAM


def tier_dir(root: str) -> str:
    """Where the tier of `root` lives: per user, per root (its resolved path, or its URL)."""
    base = os.environ.get(_BASE_ENV, "/dev/shm")
    ident = root if "://" in root else os.path.realpath(root)
    digest = hashlib.sha256(ident.encode()).hexdigest()[:24]
    return os.path.join(base, f"savepoint-{os.getuid()}", digest)


def _private_dir(path: str, *, create: bool) -> bool:
    """Whether `path` is a real directory of this user that no one else can enter (made if `create`).

    /dev/shm is writable by everyone: another user could plant a directory or a link there first.
    """
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError:
            return False
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and info.st_mode & 0o077 == 0


def _usable_tier(root: str, *, create: bool) -> str | None:
    tier = tier_dir(root)
    if not _private_dir(os.path.dirname(tier), create=create) or not _private_dir(tier, create=create):
        return None
    return tier


def publish(
    root: str, ckpt_dir: str, *, contents: Mapping[str, Iterable[bytes | memoryview]] | None = None
) -> str | None:
    """Copy the committed checkpoint `ckpt_dir` of `root` into its tier, replacing the one there.

    `contents`: the bytes of (some of) its files, relpath -> chunks, where the caller still holds
    them in memory (an async writer's snapshot): those are copied from there instead of read back
    from the disk; a file whose chunks do not add up to the manifest's size is read from the disk.
    The manifest always comes from the disk, and a restore checks every file against it.

    Returns the tier copy's path, or None (with a warning) when the tier cannot hold it. Never raises
    for the tier's own trouble: the checkpoint on disk is committed already, and that is what counts.
    """
    tier = _usable_tier(root, create=True)
    if tier is None:
        warnings.warn(
            f"memory tier: {tier_dir(root)} is not a private directory of this user; not used", stacklevel=2
        )
        return None
    manifest = read_manifest(ckpt_dir)
    need = sum(entry.size for entry in manifest.files.values())
    free = _free_bytes(tier)
    if need * _HEADROOM > free:
        warnings.warn(
            f"memory tier: {ckpt_dir} needs {need} bytes, {tier} has {free} free; the tier keeps the "
            "previous copy, if any. Restores of this step read the disk.",
            stacklevel=2,
        )
        return None
    incoming = os.path.join(tier, _INCOMING)
    shutil.rmtree(incoming, ignore_errors=True)  # a copy a crash left half-made
    try:
        os.mkdir(incoming, 0o700)
        # Files first, the manifest last: a copy without its manifest is never used.
        for relpath, entry in sorted(manifest.files.items()):
            held = (contents or {}).get(relpath)
            if held is None or not _write_file(incoming, relpath, held, entry.size):
                _copy_file(ckpt_dir, relpath, incoming)
        _copy_file(ckpt_dir, MANIFEST_NAME, incoming)
        name = os.path.basename(os.path.normpath(ckpt_dir))
        for old in os.listdir(tier):
            if old != _INCOMING:
                shutil.rmtree(os.path.join(tier, old), ignore_errors=True)
        os.rename(incoming, os.path.join(tier, name))
    except OSError as exc:  # ENOSPC when the tmpfs fills under us, most likely
        shutil.rmtree(incoming, ignore_errors=True)
        warnings.warn(
            f"memory tier: could not copy {ckpt_dir} ({exc}); restores will read the disk", stacklevel=2
        )
        return None
    return os.path.join(tier, name)


def held_copy(root: str, ckpt: str, remote: RemoteRoot | None = None) -> str | None:
    """The tier's copy of checkpoint `ckpt` (a path or URL under `root`), if it holds exactly its commit:
    a manifest byte-for-byte the one `ckpt` has now (in the object store for a `remote` root)."""
    tier = _usable_tier(root, create=False)
    if tier is None:
        return None
    step_name = os.path.basename(ckpt.rstrip("/"))
    try:
        committed = remote.manifest_bytes(step_name) if remote is not None else manifest_bytes(ckpt)
    except SavepointError:
        return None  # the ordinary read of `ckpt` reports what is wrong with it
    copy = os.path.join(tier, step_name)
    if not _private_dir(copy, create=False):
        return None
    try:
        held = read_bytes_inside(copy, MANIFEST_NAME, max_bytes=MAX_MANIFEST_BYTES)
    except (OSError, SavepointError):  # missing, a link, too large: then the disk is read
        return None
    return copy if held == committed else None


def drop(root: str) -> None:
    """Remove the tier of `root` (its shared memory) if there is one."""
    tier = _usable_tier(root, create=False)
    if tier is not None:
        shutil.rmtree(tier, ignore_errors=True)


def _free_bytes(path: str) -> int:
    info = os.statvfs(path)
    return info.f_bavail * info.f_frsize


def _create(dst_dir: str, relpath: str) -> int:
    *parents, _name = relpath.split("/")
    os.makedirs(os.path.join(dst_dir, *parents), mode=0o700, exist_ok=True)
    return os.open(
        os.path.join(dst_dir, relpath), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600
    )


def _copy_file(src_dir: str, relpath: str, dst_dir: str) -> None:
    src_fd, size = open_fd_inside(src_dir, relpath)  # what the commit wrote: still no link followed
    try:
        dst_fd = _create(dst_dir, relpath)
        try:
            copy_range(src_fd, dst_fd, size)  # in the kernel where it can
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)


def _write_file(dst_dir: str, relpath: str, chunks: Iterable[bytes | memoryview], size: int) -> bool:
    """Write `chunks` as the tier's copy of `relpath`; False (and nothing left) unless they are `size` bytes."""
    path = os.path.join(dst_dir, relpath)
    fd = _create(dst_dir, relpath)
    written = 0
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            while view.nbytes:
                n = os.write(fd, view)
                written += n
                view = view[n:]
    finally:
        os.close(fd)
    if written != size:
        os.remove(path)
        return False
    return True
