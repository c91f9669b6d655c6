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
"""

from __future__ import annotations

import filecmp
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from io import BufferedWriter, FileIO

from savepoint._hashing import hash_file, new_hasher
from savepoint.storage.local import MANIFEST_NAME, StagedDir, start_writeback, storage_error

_COMPARE_PIECE = 1024 * 1024  # a changed file is found different after reading ~1 MiB of its parent
_WRITEBACK_EVERY = 32 * 1024 * 1024


class DedupeWriter:
    """Hashes every byte; writes nothing while the bytes equal the parent's file, then copies the
    matched prefix from the parent and writes on as soon as they differ."""

    def __init__(self, path: str, parent_file: str) -> None:
        self.path = path
        self.size = 0
        self.linked = False
        self._hasher = new_hasher()
        self._parent: FileIO | None = open(parent_file, "rb", buffering=0)  # noqa: SIM115 (closed in close())
        self._parent_file = parent_file
        self._out: BufferedWriter | None = None
        self._kicked = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        self._hasher.update(view)
        if self._parent is not None and not self._matches(view):
            self._diverge()
        self.size += view.nbytes
        if self._out is not None:
            self._out.write(view)
            if self.size - self._kicked >= _WRITEBACK_EVERY:
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
            if parent.read(len(piece)) != piece:
                return False
        return True

    def _diverge(self) -> None:
        """Start the real file: the bytes that matched so far come from the parent (a kernel copy)."""
        out = open(self.path, "wb")  # noqa: SIM115 (closed in close())
        self._out = out
        with open(self._parent_file, "rb") as src:
            _copy_range(src.fileno(), out.fileno(), self.size)
        out.seek(self.size)
        self._kicked = 0
        self._close_parent()

    def finish(self) -> None:
        """Link to the parent if every byte matched and it has no more; otherwise make the file durable."""
        if self._parent is not None:
            if self._parent.read(1) == b"":
                self._close_parent()
                self.linked = _link_or_copy(self._parent_file, self.path)
            else:
                self._diverge()  # ours is a strict prefix of the parent's: a different file
        if self._out is not None:
            self._out.flush()
            os.fsync(self._out.fileno())

    def close(self) -> None:
        self._close_parent()
        if self._out is not None:
            self._out.close()
            self._out = None

    def _close_parent(self) -> None:
        if self._parent is not None:
            self._parent.close()
            self._parent = None


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

    def parent_file(self, relpath: str) -> str | None:
        """The previous checkpoint's regular file at `relpath`, if any."""
        if self.previous is None or relpath == MANIFEST_NAME:
            return None
        path = os.path.join(self.previous, relpath)
        try:
            return path if stat.S_ISREG(os.lstat(path).st_mode) else None
        except OSError:
            return None

    @contextmanager
    def create(self, relpath: str) -> Iterator[DedupeWriter]:  # type: ignore[override]
        parent_file = self.parent_file(relpath)
        if parent_file is None:
            with super().create(relpath) as plain:
                yield plain  # type: ignore[misc]
            return
        full = self.abspath(relpath)
        try:
            os.makedirs(os.path.dirname(full), exist_ok=True)
            writer = DedupeWriter(full, parent_file)
            try:
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
        if parent_file is not None and _same_bytes(full, parent_file):
            try:
                _replace_with_link(parent_file, full)
            except OSError:
                pass  # no hard links on this file system: keep (and fsync) the written copy
            else:
                self.entries[relpath] = hash_file(full)
                self.linked[relpath] = self.entries[relpath][0]
                return
        super().record(relpath)


def _committed_dir(root: str, previous: str | None) -> str | None:
    if not previous:
        return None
    path = previous if os.path.isabs(previous) else os.path.join(root, previous)
    # Only a committed checkpoint (its manifest exists) is immutable; never link into a temp dir.
    return path if os.path.isfile(os.path.join(path, MANIFEST_NAME)) else None


def _same_bytes(a: str, b: str) -> bool:
    try:
        return os.path.getsize(a) == os.path.getsize(b) and filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def _replace_with_link(source: str, target: str) -> None:
    tmp = f"{target}.link-{secrets.token_hex(4)}"
    os.link(source, tmp)
    try:
        os.replace(tmp, target)
    except OSError:
        os.unlink(tmp)
        raise


def _link_or_copy(source: str, target: str) -> bool:
    """Hard-link `source` at `target`; where links are impossible, copy it durably. True if linked."""
    try:
        os.link(source, target)
        return True
    except OSError:
        # EXDEV, EPERM, EMLINK, ENOTSUP...: the content is known equal, so a copy is just as good.
        shutil.copyfile(source, target)
        with open(target, "rb+") as f:
            os.fsync(f.fileno())
        return False


def _copy_range(src_fd: int, dst_fd: int, nbytes: int) -> None:
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
