"""Reading safetensors files without mapping them: a checked header, then one positional read per tensor.

`safetensors.safe_open` maps the whole file copy-on-write. The kernel's overcommit heuristic refuses a
private writable mapping larger than RAM, so a 26 GB `model.safetensors` cannot even be opened on a
24 GiB machine, and the pages it touches count against the reader's RSS until the file is closed.
This reader parses the header itself, with every cap the library applies, and reads each tensor with
`os.preadv` into a buffer of its own: memory is the tensors the caller keeps alive, nothing more.

    >>> with open_safetensors("runs/x/step-00000100", "model.safetensors") as f:  # doctest: +SKIP
    ...     w = f.read("lm_head.weight")
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch

from savepoint.errors import CorruptCheckpointError, Problem
from savepoint.io import direct
from savepoint.io.files import open_fd_inside
from savepoint.io.memory import Allocate, empty_buffer

# safetensors' own limit on the JSON header; a claimed length above it is refused before any read.
MAX_HEADER_BYTES = 100_000_000
_READ_CHUNK = 1 << 30  # Linux returns at most ~2 GiB per read; loop in 1 GiB steps
_READ_AHEAD = 256 << 20  # page cache, not RSS: what the kernel may fetch while the caller computes

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "C64": torch.complex64,
}
if hasattr(torch, "float8_e8m0fnu"):
    DTYPES["F8_E8M0"] = torch.float8_e8m0fnu
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor's place in a file: `start`/`end` are absolute file offsets."""

    name: str
    dtype_name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"the name {dup!r} appears twice")
    return dict(pairs)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parse_header(raw: bytes, data_bytes: int) -> tuple[dict[str, TensorEntry], dict[str, str] | None]:
    """The tensors and metadata of a header; ValueError (with the reason) for anything malformed.

    `data_bytes` is the size of the byte buffer after the header: tensors must tile it exactly, in
    offset order, with no gap or overlap, each exactly `numel * itemsize` bytes long.
    """
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise ValueError("the header nests too deeply") from None
    if not isinstance(doc, dict):
        raise ValueError("the header is not a JSON object")
    metadata = doc.pop("__metadata__", None)
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values())
    ):
        raise ValueError("__metadata__ must map names to strings")
    entries: dict[str, TensorEntry] = {}
    for name, info in doc.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"tensor {name!r} needs exactly dtype, shape and data_offsets")
        dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
            raise ValueError(
                f"tensor {name!r} has dtype {str(dtype_name)[:20]!r}, which savepoint cannot read"
            )
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise ValueError(f"tensor {name!r} has a shape that is not a list of counts")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
            raise ValueError(f"tensor {name!r} has data_offsets that are not two counts")
        start, end = offsets
        dtype = DTYPES[dtype_name]
        numel = 1
        for d in shape:
            numel *= d
        if end < start or end - start != numel * dtype.itemsize:
            raise ValueError(
                f"tensor {name!r} claims {dtype_name}{shape} ({numel * dtype.itemsize} bytes) "
                f"but data_offsets [{start}, {end}] span {end - start}"
            )
        entries[name] = TensorEntry(name, dtype_name, dtype, tuple(shape), start, end)
    expected = 0
    for e in sorted(entries.values(), key=lambda e: (e.start, e.end)):
        if e.start != expected:
            raise ValueError(
                f"tensor {e.name!r} starts at {e.start}, not where the previous ends ({expected})"
            )
        expected = e.end
    if expected != data_bytes:
        raise ValueError(
            f"the tensors cover {expected} bytes but the file holds {data_bytes} after the header"
        )
    return entries, metadata


class SafetensorsFile(AbstractContextManager["SafetensorsFile"]):
    """An open safetensors file with a checked header; tensors are read on demand, never mapped."""

    def __init__(
        self,
        fd: int,
        size: int,
        root: str,
        relpath: str,
        on_read: Callable[[memoryview], object] | None = None,
        *,
        direct: bool = False,
    ) -> None:
        """`on_read` sees every byte read, in the order read (a checksum while reading: the header, then
        the tensors in file order, tile the whole file). `direct=True` reads large tensors with O_DIRECT
        (`savepoint.io.direct`): for one pass over a file too big to stay cached, such as a merge's base;
        a file read again soon (a restore right after a save) is better served from the page cache."""
        self._fd: int | None = fd
        self._direct_fd: int | None = None  # O_DIRECT twin of `_fd`, opened at the first large read
        self._direct_refused = not direct
        self.root, self.relpath = root, relpath
        self._on_read = on_read
        try:
            self.entries, self.metadata, self._data_start = self._read_header(size)
        except BaseException:
            self.close()
            raise

    def _fail(self, reason: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            self.root, [Problem(self.relpath, f"not a readable safetensors file: {reason}")]
        )

    def _read_header(self, size: int) -> tuple[dict[str, TensorEntry], dict[str, str] | None, int]:
        if size < 8:
            raise self._fail(f"{size} bytes, too short for the 8-byte header length")
        (length,) = struct.unpack("<Q", self._pread_exact(8, 0))
        if length > MAX_HEADER_BYTES or length > size - 8:
            raise self._fail(f"the header claims {length} bytes, more than the file or the limit allows")
        raw = self._pread_exact(length, 8)
        if not raw.startswith(b"{"):
            raise self._fail("the header does not start with '{'")
        try:
            entries, metadata = parse_header(raw, size - 8 - length)
        except ValueError as exc:  # includes UnicodeDecodeError and JSONDecodeError
            raise self._fail(str(exc)[:300]) from exc
        base = 8 + length
        entries = {
            k: TensorEntry(e.name, e.dtype_name, e.dtype, e.shape, e.start + base, e.end + base)
            for k, e in entries.items()
        }
        return entries, metadata, base

    def _pread_exact(self, nbytes: int, offset: int) -> bytes:
        buf = bytearray(nbytes)
        self._pread_into(memoryview(buf), offset)
        return bytes(buf)

    def _pread_into(self, view: memoryview, offset: int) -> None:
        if self._fd is None:
            raise ValueError("read from a closed safetensors file")
        done = 0
        while done < view.nbytes:
            n = os.preadv(self._fd, [view[done : done + _READ_CHUNK]], offset + done)
            if n == 0:
                raise self._fail(f"the file ends at byte {offset + done}, inside a tensor it declares")
            done += n
        if self._on_read is not None:
            self._on_read(view)

    def keys(self) -> list[str]:
        return list(self.entries)

    def read(self, name: str, allocate: Allocate = empty_buffer) -> torch.Tensor:
        """A tensor of its own holding `name`'s bytes (KeyError for an unknown name); `allocate(shape,
        dtype)` makes the buffer (a BufferPool's `take` recycles memory across a pass).

        The tensor after it in the file is then announced to the kernel (POSIX_FADV_WILLNEED), so a
        pass in file order reads the next tensor from disk while the caller works on this one."""
        e = self.entries[name]
        if not e.nbytes:
            return torch.empty(e.shape, dtype=e.dtype)
        if e.nbytes >= direct.MIN_DIRECT_BYTES and e.start % e.dtype.itemsize == 0:
            data = self._read_direct(e, allocate)
            if data is not None:
                return data.view(e.dtype).reshape(e.shape)
        buf = allocate((e.nbytes,), torch.uint8)
        array: Any = buf.numpy()  # shares buf's memory: the read lands in the tensor
        self._pread_into(memoryview(array), e.start)
        if self._fd is not None and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, e.end, _READ_AHEAD, os.POSIX_FADV_WILLNEED)
        return buf.view(e.dtype).reshape(e.shape)

    def _read_direct(self, e: TensorEntry, allocate: Allocate) -> torch.Tensor | None:
        """`e`'s bytes (uint8) read with O_DIRECT: the aligned window around the tensor lands in one
        buffer and the tensor is the part of it at its offset. None where the file refuses O_DIRECT."""
        if self._fd is None:
            raise ValueError("read from a closed safetensors file")
        if self._direct_fd is None and not self._direct_refused:
            self._direct_fd = direct.reopen_direct(self._fd, os.O_RDONLY)
            self._direct_refused = self._direct_fd is None
        if self._direct_fd is None:
            return None
        lo, hi = direct.aligned_window(e.start, e.end)
        window = direct.aligned_part(allocate((hi - lo + direct.ALIGN,), torch.uint8), hi - lo)
        array: Any = window.numpy()
        view, done = memoryview(array), 0
        try:
            while lo + done < e.end:  # the window may run past the end of the file: stop at the tensor's
                n = os.preadv(self._direct_fd, [view[done:]], lo + done)
                if n == 0:
                    raise self._fail(f"the file ends at byte {lo + done}, inside a tensor it declares")
                done += n
        except OSError:  # EINVAL: this file system wants another alignment after all
            os.close(self._direct_fd)
            self._direct_fd, self._direct_refused = None, True
            return None
        data = window[e.start - lo : e.end - lo]
        if self._on_read is not None:
            self._on_read(view[e.start - lo : e.end - lo])
        return data

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) in file order, one read at a time."""
        for e in sorted(self.entries.values(), key=lambda e: e.start):
            yield e.name, self.read(e.name)

    def close(self) -> None:
        if self._direct_fd is not None:
            os.close(self._direct_fd)
            self._direct_fd = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def open_safetensors(root: str, relpath: str, *, direct: bool = False) -> SafetensorsFile:
    """Open `root/relpath` (no symlink followed below `root`, regular file only) and check its header;
    `direct`: see SafetensorsFile.

    Raises CorruptCheckpointError naming the file for a malformed header, UnsafeCheckpointError for a
    symlink or special file, and the plain OSError (FileNotFoundError, ...) when it cannot be opened.
    """
    fd, size = open_fd_inside(root, relpath)
    return SafetensorsFile(fd, size, root, relpath, direct=direct)


def open_path(path: str, *, root: str, relpath: str) -> SafetensorsFile:
    """`open_safetensors` for callers holding a full path: `root/relpath` when that is `path`, else
    the path's own directory is the trusted one (errors still name `root` and `relpath`)."""
    if os.path.normpath(os.path.join(root, relpath)) == os.path.normpath(path):
        return open_safetensors(root, relpath)
    fd, size = open_fd_inside(os.path.dirname(path) or ".", os.path.basename(path))
    return SafetensorsFile(fd, size, root, relpath)
