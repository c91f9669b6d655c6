"""Hard-link dedupe: a file equal to the same file of the previous checkpoint is linked, not rewritten.

Frozen layers in their own shard, an unchanged tokenizer or config: their bytes are already durable
in the parent checkpoint, so the new checkpoint gets a hard link to the same inode and the disk
writes nothing. Equality is decided on the bytes themselves, streamed against the parent's file as
they are produced, never on a recorded checksum: a parent file that rotted since it was written
differs from what we are saving and is simply not linked. The manifest entry is the checksum of the
bytes we produced, so the new checkpoint verifies on its own.

    staged = DedupingStagedDir(root, "step-00000200", previous="step-00000100")
    with staged.create("model-00001-of-00002.safetensors") as out:   # linked if unchanged
        write_safetensors(out, tensors)

Committed checkpoints are never modified in place (only renamed and removed), so two of them
sharing an inode is safe; deleting one leaves the other's link intact.

Who may be linked to (the root may hold files someone else made: DESIGN.md, promise 4). A link shares
the inode, so whoever can write the parent file could later change the new checkpoint. The parent
file is opened below the previous checkpoint without following any symlink, and is linked only if
that open file is a regular file that the current user owns, that neither group nor others may write,
that lies on the root's file system, and whose link count is no larger than the number of checkpoint
directories in the root, leftovers included, besides this save's own (each holds at most one link:
more means a name outside the root). Otherwise its bytes are copied. The link is made by name and
then checked to be that same inode (a file swapped in between is unlinked and copied instead).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import BinaryIO

from savepoint._hashing import hash_file, new_hasher
from savepoint.errors import SavepointError
from savepoint.io.direct import ALIGN, DirectFile
from savepoint.io.direct import enabled as direct_enabled
from savepoint.io.files import open_fd_inside
from savepoint.storage.local import (
    DELETE_PREFIX,
    MANIFEST_NAME,
    REPLACED_PREFIX,
    TMP_PREFIX,
    StagedDir,
    start_writeback,
    storage_error,
)

_COMPARE_PIECE = 1024 * 1024  # a changed file is found different after reading ~1 MiB of its parent
_WRITEBACK_EVERY = 32 * 1024 * 1024
_LINK_HOLDERS = ("step-", TMP_PREFIX, DELETE_PREFIX, REPLACED_PREFIX)


@dataclass
class ParentFile:
    """The previous checkpoint's file, open: `fd` is the very file the link rule was checked on."""

    path: str
    fd: int
    size: int
    may_link: bool

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class DedupeWriter:
    """Hashes every byte; writes nothing while the bytes equal the parent's file, then copies the
    matched prefix from the parent and writes on as soon as they differ."""

    def __init__(self, path: str, parent: ParentFile) -> None:
        self.path = path
        self.size = 0
        self.linked = False
        self._hasher = new_hasher()
        self._source = parent
        self._parent: ParentFile | None = parent
        self._offset = 0
        self._out: BinaryIO | DirectFile | None = None
        self._kicked = 0
        # Decided here: the writes (and the divergence) may come from a helper thread of the caller's.
        self._direct = direct_enabled()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        self._hasher.update(view)
        if self._parent is not None and not self._matches(view):
            self._diverge()
        self.size += view.nbytes
        if self._out is not None:
            self._out.write(view)
            if not isinstance(self._out, DirectFile) and self.size - self._kicked >= _WRITEBACK_EVERY:
                self._out.flush()
                start_writeback(self._out.fileno(), self._kicked, self.size - self._kicked)
                self._kicked = self.size
        return view.nbytes

    def digest(self) -> str:
        return self._hasher.hexdigest()

    def _matches(self, view: memoryview) -> bool:
        parent = self._parent
        if parent is None:
            return False
        for start in range(0, view.nbytes, _COMPARE_PIECE):
            piece = bytes(view[start : start + _COMPARE_PIECE])  # bytes == bytes is a memcmp
            if os.pread(parent.fd, len(piece), self._offset) != piece:
                return False
            self._offset += len(piece)
        return True

    def _diverge(self) -> None:
        """Start the real file: the bytes that matched so far come from the parent (a kernel copy)."""
        self._kicked = 0
        if not self._direct:
            out = open(self.path, "wb")  # noqa: SIM115 (closed in close())
            self._out = out
            copy_range(self._source.fd, out.fileno(), self.size)
            out.seek(self.size)
            self._parent = None
            return
        # O_DIRECT (async writers): the kernel copies the block-aligned prefix, the rest goes through
        # the DirectFile's buffer so that its writes start on a block boundary.
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        aligned = self.size - self.size % ALIGN
        try:
            copy_range(self._source.fd, fd, aligned)
            direct = DirectFile(fd, start=aligned)
        except BaseException:
            os.close(fd)
            raise
        self._out = direct
        direct.write(_pread_exact(self._source.fd, self.size - aligned, aligned))
        self._parent = None

    def finish(self) -> None:
        """Link to the parent if every byte matched and it has no more; otherwise make the file durable."""
        if self._parent is not None:
            if os.pread(self._parent.fd, 1, self._offset) == b"":
                self._parent = None
                self.linked = _link_or_copy(self._source, self.path)
            else:
                self._diverge()  # ours is a strict prefix of the parent's: a different file
        if self._out is not None:
            self._out.flush()
            os.fsync(self._out.fileno())

    def close(self) -> None:
        self._parent = None
        self._source.close()
        if self._out is not None:
            self._out.close()
            self._out = None


class DedupingStagedDir(StagedDir):
    """A StagedDir that hard-links files unchanged since the `previous` checkpoint (same relpath).

    `previous` is the parent checkpoint's name under the same root (or a path); without one, or when
    it is not a committed checkpoint, this is a plain StagedDir. `linked` maps relpaths to the bytes
    not written.
    """

    def __init__(self, parent: str, final_name: str, *, previous: str | None = None) -> None:
        super().__init__(parent, final_name)
        self.previous = _committed_dir(parent, previous)
        self.linked: dict[str, int] = {}

    def parent_file(self, relpath: str) -> ParentFile | None:
        """The previous checkpoint's regular file at `relpath`, open (close it), if there is one."""
        if self.previous is None or relpath == MANIFEST_NAME:
            return None
        try:
            fd, size = open_fd_inside(self.previous, relpath)
        except (OSError, SavepointError):
            return None  # missing, a symlink, a FIFO...: nothing to compare with, write the file
        try:
            may_link = _may_link(fd, self.parent)
        except OSError:
            os.close(fd)
            return None
        return ParentFile(os.path.join(self.previous, relpath), fd, size, may_link)

    @contextmanager
    def create(self, relpath: str, *, direct: bool = False) -> Iterator[DedupeWriter]:  # type: ignore[override]
        parent_file = self.parent_file(relpath)
        if parent_file is not None and not parent_file.may_link:
            parent_file.close()
            parent_file = None
        if parent_file is None:
            with super().create(relpath, direct=direct) as plain:
                yield plain  # type: ignore[misc]
            return
        full = self.abspath(relpath)
        writer = DedupeWriter(full, parent_file)
        try:
            try:
                os.makedirs(os.path.dirname(full), exist_ok=True)
                yield writer
                writer.finish()
            finally:
                writer.close()
        except OSError as exc:
            raise storage_error(exc, full, "writing") from exc
        self.entries[relpath] = (writer.size, writer.digest())
        if writer.linked:
            self.linked[relpath] = writer.size

    def record(self, relpath: str) -> None:
        """Register a file another library wrote; if the parent has the same bytes, link to it instead
        (before the fsync, so the copy's dirty pages are dropped rather than written)."""
        parent_file = self.parent_file(relpath)
        full = self.abspath(relpath)
        if parent_file is None:
            super().record(relpath)
            return
        try:
            if parent_file.may_link and _same_bytes(full, parent_file):
                try:
                    _replace_with_link(parent_file, full)
                except OSError:
                    pass  # no hard links here, or the parent changed under us: keep (and fsync) the copy
                else:
                    self.entries[relpath] = hash_file(full)
                    self.linked[relpath] = self.entries[relpath][0]
                    return
        finally:
            parent_file.close()
        super().record(relpath)


def _committed_dir(root: str, previous: str | None) -> str | None:
    """The previous checkpoint, only if it is a real directory directly in `root` with a manifest file."""
    if not previous:
        return None
    path = previous if os.path.isabs(previous) else os.path.join(root, previous)
    if os.path.dirname(os.path.abspath(path)) != os.path.abspath(root):
        return None  # dedupe links only inside the same root
    try:
        fd, _ = open_fd_inside(root, f"{os.path.basename(path)}/{MANIFEST_NAME}")
    except (OSError, SavepointError):
        return None  # not committed (never link into a temp dir), or a symlink out of the root
    os.close(fd)
    return path


def _may_link(fd: int, root: str) -> bool:
    """The link rule of the module docstring, on the open parent file."""
    info = os.fstat(fd)
    if info.st_uid != os.geteuid() or info.st_mode & 0o022:
        return False
    if info.st_dev != os.stat(root).st_dev:
        return False
    # Each checkpoint (or leftover being deleted) holds at most one link to this inode; the staging
    # directory of this very save holds none yet.
    holders = [n for n in os.listdir(root) if n.startswith(_LINK_HOLDERS)]
    return info.st_nlink <= max(1, len(holders) - 1)


def _same_bytes(path: str, parent: ParentFile) -> bool:
    try:
        if os.path.getsize(path) != parent.size:
            return False
        with open(path, "rb", buffering=0) as f:
            offset = 0
            while piece := f.read(_COMPARE_PIECE):
                if os.pread(parent.fd, len(piece), offset) != piece:
                    return False
                offset += len(piece)
        return True
    except OSError:
        return False


def _same_inode(parent: ParentFile, path: str) -> bool:
    a, b = os.fstat(parent.fd), os.lstat(path)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _replace_with_link(parent: ParentFile, target: str) -> None:
    tmp = f"{target}.link-{secrets.token_hex(4)}"
    os.link(parent.path, tmp, follow_symlinks=False)
    try:
        if not _same_inode(parent, tmp):  # the name now points at another file than the one checked
            raise OSError(f"{parent.path} changed while it was linked")
        os.replace(tmp, target)
    except OSError:
        with suppress(OSError):
            os.unlink(tmp)
        raise


def _link_or_copy(parent: ParentFile, target: str) -> bool:
    """Hard-link the parent file at `target` if the link rule allows; otherwise copy it durably."""
    if parent.may_link:
        try:
            os.link(parent.path, target, follow_symlinks=False)
            if _same_inode(parent, target):
                return True
            os.unlink(target)  # swapped between the check and the link: copy the checked bytes instead
        except OSError:
            pass  # EXDEV, EPERM, EMLINK, ENOTSUP...: the content is known equal, so a copy is as good
    with open(target, "wb") as out:
        copy_range(parent.fd, out.fileno(), parent.size)
        out.flush()
        os.fsync(out.fileno())
    return False


def _pread_exact(fd: int, nbytes: int, offset: int) -> bytes:
    got = os.pread(fd, nbytes, offset)
    if len(got) != nbytes:
        raise OSError(f"the parent file ended after {offset + len(got)} of {offset + nbytes} bytes")
    return got


def copy_range(src_fd: int, dst_fd: int, nbytes: int) -> None:
    """Copy the first `nbytes` of src to dst, in the kernel where it can (copy_file_range)."""
    offset = 0
    while offset < nbytes:
        try:
            n = os.copy_file_range(src_fd, dst_fd, nbytes - offset, offset, offset)
        except (AttributeError, OSError):
            n = os.pwrite(dst_fd, os.pread(src_fd, min(nbytes - offset, 1 << 24), offset), offset)
        if n == 0:
            raise OSError(f"the parent file ended after {offset} of {nbytes} bytes")
        offset += n
