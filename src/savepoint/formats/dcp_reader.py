"""Loading tensors from a DCP directory through metadata savepoint has already checked.

torch's `FileSystemReader` would unpickle `.metadata` itself and open data files by joining whatever
path the metadata names, following symlinks. `VerifiedReader` hands DCP the `Metadata` built by
`dcp_metadata.parse_metadata` instead, opens each data file below the DCP directory without following
any symlink (regular files only), and refuses a byte item should a plan ever ask for one. The tensor
records inside `.distcp` files are still decoded by DCP itself, with `torch.load(weights_only=True)`:
torch's own allow-list unpickler, which builds tensors and plain containers only.

    >>> metadata = read_dcp_metadata(ckpt, "train_state/dcp", sizes)  # doctest: +SKIP
    >>> load_tensors(os.path.join(ckpt, "train_state/dcp"), metadata, buffers)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import io
import os
import warnings
from collections.abc import Generator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.planner import LoadItemType

from savepoint.errors import CorruptCheckpointError, Problem, SavepointError, UnsafeCheckpointError
from savepoint.formats.dcp_metadata import MAX_METADATA_BYTES, parse_metadata
from savepoint.formats.dcp_ranges import RangeCheckedStream, RangeRecords
from savepoint.io.files import open_fd_inside, read_bytes_inside

METADATA_NAME = ".metadata"


def read_dcp_metadata(root: str, dcp_rel: str, file_sizes: Mapping[str, int] | None = None) -> Any:
    """The checked `Metadata` of the DCP directory `root/dcp_rel` ("" for `root` itself).

    `file_sizes`: the data files the caller vouches for (a verified manifest's entries, by name inside
    the DCP directory). None, for a bare DCP directory: every regular file directly inside it, opened
    without following symlinks.
    """
    relpath = f"{dcp_rel}/{METADATA_NAME}" if dcp_rel else METADATA_NAME
    data = read_bytes_inside(root, relpath, max_bytes=MAX_METADATA_BYTES)
    if file_sizes is None:
        file_sizes = _bare_file_sizes(root, dcp_rel)
    return parse_metadata(data, file_sizes, checkpoint=root, relpath=relpath)


def _bare_file_sizes(root: str, dcp_rel: str) -> dict[str, int]:
    directory = os.path.join(root, dcp_rel) if dcp_rel else root
    sizes = {}
    for name in sorted(os.listdir(directory)):
        if name == METADATA_NAME or name.startswith("."):
            continue
        try:
            fd, size = open_fd_inside(root, f"{dcp_rel}/{name}" if dcp_rel else name)
        except (SavepointError, OSError):
            continue  # a symlink, a directory, a FIFO: not a data file any entry may name
        os.close(fd)
        sizes[name] = size
    return sizes


class _NoFollowFileSystem(FileSystem):
    """DCP's file system for reading: files directly inside one directory, opened safely; with `ranges`,
    each item's bytes are checked against their recorded checksum as they are read."""

    def __init__(self, directory: str, ranges: RangeRecords | None = None, checkpoint: str = "") -> None:
        super().__init__()
        self.directory = os.path.abspath(directory)
        self.ranges, self.checkpoint = ranges, checkpoint or directory
        self.bytes_read = 0

    @contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Generator[io.IOBase, None, None]:
        name = os.path.relpath(os.path.abspath(os.fspath(path)), self.directory)
        if mode != "rb" or os.sep in name or name.startswith(".."):
            raise UnsafeCheckpointError(
                self.directory, [Problem(name, "not a data file of this DCP directory")]
            )
        fd, _ = open_fd_inside(self.directory, name)
        if self.ranges is None:
            with open(fd, "rb") as stream:  # buffered: DCP seeks and reads small records
                yield stream
            return
        relpath = f"{self.ranges.dcp_rel}/{name}"

        def fail(reason: str) -> CorruptCheckpointError:
            return CorruptCheckpointError(self.checkpoint, [Problem(relpath, reason)])

        try:
            checked = RangeCheckedStream(fd, self.ranges.for_file(name), fail)
        except BaseException:
            os.close(fd)
            raise
        with checked:
            try:
                yield checked
            finally:
                self.bytes_read += checked.bytes_read


class VerifiedReader(FileSystemReader):
    """A `FileSystemReader` that serves checked metadata and opens files without following symlinks."""

    def __init__(
        self, directory: str, metadata: Any, ranges: RangeRecords | None = None, checkpoint: str = ""
    ) -> None:
        super().__init__(directory)
        self.checked_fs = _NoFollowFileSystem(directory, ranges, checkpoint)
        self.fs = self.checked_fs
        self._checked = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("rank") is not None:  # per-rank metadata files: savepoint checked only the global one
            raise UnsafeCheckpointError(os.fspath(self.path), [Problem(".metadata", "per-rank metadata")])
        from torch.distributed.checkpoint.metadata import StorageMeta

        return dataclasses.replace(self._checked, storage_meta=StorageMeta(load_id=self.load_id))

    def read_data(self, plan: Any, planner: Any) -> Any:
        if any(item.type == LoadItemType.BYTE_IO for item in plan.items):
            raise UnsafeCheckpointError(
                os.fspath(self.path), [Problem(".metadata", "a byte item (it would be unpickled)")]
            )
        return super().read_data(plan, planner)


def load_tensors(
    directory: str,
    metadata: Any,
    targets: dict[str, torch.Tensor],
    *,
    checkpoint: str,
    process_group: Any = None,
    ranges: RangeRecords | None = None,
) -> int:
    """Fill `targets` (plain tensors or DTensors; DCP reshards) from the DCP directory, in place; return
    the data bytes this process read when `ranges` checks each item as it is read (else 0).

    Collective when `process_group` is given. A failure while reading (a tensor record that does not
    decode, a chunk of the wrong size) is a CorruptCheckpointError naming the checkpoint.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    reader = VerifiedReader(directory, metadata, ranges, checkpoint)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            if process_group is not None:
                dcp.load(targets, storage_reader=reader, process_group=process_group)
            else:
                dcp.load(targets, storage_reader=reader, no_dist=True)
        return reader.checked_fs.bytes_read
    except SavepointError:
        raise
    except (Exception, CheckpointException) as exc:
        # DCP wraps every rank's failure in a CheckpointException; a SavepointError raised by our
        # reader travels inside it.
        inner = _savepoint_error(exc)
        if inner is not None:
            raise inner from exc
        raise CorruptCheckpointError(
            checkpoint,
            [Problem(os.path.basename(directory) or directory, f"DCP could not read it: {exc}"[:500])],
        ) from exc


def _savepoint_error(exc: BaseException) -> SavepointError | None:
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict):
        for failure in failures.values():
            found = failure[0] if isinstance(failure, tuple) and failure else failure
            if isinstance(found, SavepointError):
                return found
    cause = exc.__cause__ or exc.__context__
    return cause if isinstance(cause, SavepointError) else None
