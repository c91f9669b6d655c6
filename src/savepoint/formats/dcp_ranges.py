"""Per-item checksums of DCP data files, so that a rank reading only some byte ranges can check them.

A rank restoring at another world size reads only the stored items (byte ranges of `.distcp` files)
that overlap its shards, so the manifest's whole-file checksums cannot be checked from what it reads.
At save time each rank hashes its own data files once (the pass that gives the manifest its
checksums) and, in the same pass, each item DCP wrote there; it writes them as a side record:

    train_state/dcp_ranges/rank-00003.json   {"files": {"__3_0.distcp": [[offset, length, xxh3-128], ...]}}

The record is itself a listed file, checked against the manifest when read. On restore,
`RangeCheckedStream` serves DCP each item only after the item's bytes, read once, match their record.
Checkpoints written before these records exist are verified whole before they are read.

An item is held in memory once more while DCP decodes it (its bytes, then the tensor): items are one
tensor's shard each, so this is bounded by the largest shard, not by the checkpoint.
"""

from __future__ import annotations

import bisect
import io
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from torch.distributed.checkpoint import FileSystemWriter

from savepoint._hashing import CHECKSUM_ALGORITHM, new_hasher
from savepoint.errors import CorruptCheckpointError, Problem
from savepoint.manifest import Manifest
from savepoint.storage.local import StagedDir, storage_error
from savepoint.verified_read import read_bytes_verified

RANGES_DIR = "train_state/dcp_ranges"
_FORMAT = "savepoint-dcp-ranges"
_CHUNK = 16 * 1024 * 1024
MAX_RECORD_BYTES = 64 * 1024 * 1024  # ~1M items of one rank; a record past it is refused unread
_RANK_FILE = re.compile(r"__(\d+)_\d+\.distcp$")

Range = tuple[int, int, str]  # offset, length, hex digest


def record_name(rank: int) -> str:
    return f"{RANGES_DIR}/rank-{rank:05d}.json"


def record_of(dcp_file: str) -> str | None:
    """The record holding the item checksums of DCP data file `dcp_file` (None: not a rank's file)."""
    owner = _RANK_FILE.search(dcp_file)
    return record_name(int(owner.group(1))) if owner else None


def has_range_records(manifest: Manifest) -> bool:
    return any(p.startswith(RANGES_DIR + "/") for p in manifest.files)


# ---------------------------------------------------------------- saving


class RangeRecordingWriter(FileSystemWriter):
    """DCP's file writer, keeping where each item this rank wrote landed (file, offset, length)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.items: dict[str, list[tuple[int, int]]] = {}

    def write_data(self, plan: Any, planner: Any) -> Any:
        future = super().write_data(plan, planner)
        for result in future.wait():
            info = result.storage_data
            self.items.setdefault(info.relative_path, []).append((int(info.offset), int(info.length)))
        return future


def record_files(
    staged: StagedDir, dcp_rel: str, names: list[str], items: Mapping[str, list[tuple[int, int]]], rank: int
) -> None:
    """Register this rank's DCP files in `staged` (size and checksum, as `StagedDir.record` does) and
    write the side record of their items, hashing each file in a single read."""
    files: dict[str, list[list[Any]]] = {}
    for name in names:
        rel = f"{dcp_rel}/{name}"
        size, digest, ranges = _hash_with_ranges(staged.abspath(rel), sorted(items.get(name, [])))
        staged.entries[rel] = (size, digest)
        if ranges:
            files[name] = [list(r) for r in ranges]
    doc = {"format": _FORMAT, "checksum_algorithm": CHECKSUM_ALGORITHM, "files": files}
    staged.write_bytes(record_name(rank), json.dumps(doc, sort_keys=True).encode())


def _hash_with_ranges(path: str, spans: list[tuple[int, int]]) -> tuple[int, str, list[Range]]:
    """(size, whole-file digest, digest of each span) from one sequential read (DCP wrote it with fsync)."""
    whole = new_hasher()
    hashers = [new_hasher() for _ in spans]
    pos, first = 0, 0
    try:
        with open(path, "rb", buffering=0) as f:
            os.fsync(f.fileno())
            while chunk := f.read(_CHUNK):
                end = pos + len(chunk)
                whole.update(chunk)
                view = memoryview(chunk)
                while first < len(spans) and spans[first][0] + spans[first][1] <= pos:
                    first += 1
                for i in range(first, len(spans)):
                    start, length = spans[i]
                    if start >= end:
                        break
                    lo, hi = max(start, pos), min(start + length, end)
                    if lo < hi:
                        hashers[i].update(view[lo - pos : hi - pos])
                pos = end
    except OSError as exc:
        raise storage_error(exc, path, "recording") from exc
    return pos, whole.hexdigest(), [(s, n, h.hexdigest()) for (s, n), h in zip(spans, hashers, strict=True)]


# ---------------------------------------------------------------- restoring


class RangeRecords:
    """The recorded item ranges of a checkpoint's DCP files, each rank's record read (and checked
    against the manifest) only when a file of that rank is first opened."""

    def __init__(self, ckpt_dir: str, manifest: Manifest, dcp_rel: str) -> None:
        self.ckpt_dir, self.manifest, self.dcp_rel = ckpt_dir, manifest, dcp_rel
        self._by_rank: dict[int, dict[str, list[Range]]] = {}

    def _fail(self, relpath: str, reason: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(self.ckpt_dir, [Problem(relpath, reason)])

    def for_file(self, name: str) -> list[Range]:
        owner = _RANK_FILE.match(name)
        if owner is None:
            raise self._fail(
                f"{self.dcp_rel}/{name}", "a DCP data file of no rank: no item checksums recorded"
            )
        rank = int(owner.group(1))
        if rank not in self._by_rank:
            self._by_rank[rank] = self._read(rank)
        ranges = self._by_rank[rank].get(name)
        if ranges is None:
            raise self._fail(record_name(rank), f"no item checksums for {name}")
        return ranges

    def _read(self, rank: int) -> dict[str, list[Range]]:
        rel = record_name(rank)
        raw = read_bytes_verified(self.ckpt_dir, self.manifest, rel, max_bytes=MAX_RECORD_BYTES)
        try:
            doc = json.loads(raw)
            files = doc["files"]
            out = {str(name): sorted(_span(span) for span in spans) for name, spans in files.items()}
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise self._fail(rel, f"not a record of item checksums ({exc})"[:300]) from exc
        for name, spans in out.items():
            size = self.manifest.files.get(f"{self.dcp_rel}/{name}")
            end = 0
            for offset, length, _ in spans:
                if offset < end or length < 0 or size is None or offset + length > size.size:
                    raise self._fail(rel, f"item ranges of {name} overlap or leave the file")
                end = offset + length
        return out


def _span(span: Any) -> Range:
    """One recorded item, [offset, length, hex digest], with whole non-negative numbers only (a float,
    a bool or JSON's Infinity is a forged record, never a rounding to accept)."""
    offset, length, digest = span
    if not all(type(v) is int and 0 <= v < 2**63 for v in (offset, length)) or not isinstance(digest, str):
        raise ValueError(f"an item is not [offset, length, checksum]: {str(span)[:80]}")
    return offset, length, digest


class RangeCheckedStream(io.RawIOBase):
    """A read-only view of one DCP data file that reads each recorded item whole, once, checks its
    checksum, and only then serves its bytes; bytes outside every recorded item are refused."""

    def __init__(self, fd: int, ranges: list[Range], fail: Callable[[str], Exception]) -> None:
        super().__init__()
        self._fd, self._ranges, self._fail = fd, ranges, fail
        self._starts = [r[0] for r in ranges]
        self._size = os.fstat(fd).st_size
        self._pos = 0
        self._start, self._data = -1, memoryview(b"")
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        out = memoryview(buffer).cast("B")
        if self._pos >= self._size or not out.nbytes:
            return 0
        if not self._start <= self._pos < self._start + self._data.nbytes:
            self._load(self._pos)
        at = self._pos - self._start
        n = min(out.nbytes, self._data.nbytes - at)
        out[:n] = self._data[at : at + n]
        self._pos += n
        return n

    def _load(self, pos: int) -> None:
        i = bisect.bisect_right(self._starts, pos) - 1
        if i < 0 or pos >= self._ranges[i][0] + self._ranges[i][1]:
            raise self._fail(f"bytes at offset {pos} lie in no item with a recorded checksum")
        start, length, digest = self._ranges[i]
        if start + length > self._size:  # before the buffer: memory follows the file, not the record
            raise self._fail(f"the item at bytes {start}..{start + length} ends past the file's {self._size}")
        buf = bytearray(length)
        view, done = memoryview(buf), 0
        while done < length:
            n = os.preadv(self._fd, [view[done:]], start + done)
            if n == 0:
                raise self._fail(f"the file ends inside the item at bytes {start}..{start + length}")
            done += n
        self.bytes_read += done
        hasher = new_hasher()
        hasher.update(view)
        if hasher.hexdigest() != digest:
            raise self._fail(
                f"checksum mismatch in the item at bytes {start}..{start + length} "
                f"(xxh3-128 {hasher.hexdigest()}, recorded {digest})"
            )
        self._start, self._data = start, view

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()
