"""Streaming safetensors: the header from names, dtypes and shapes, then each tensor as it is produced.

safetensors' own `save_file` builds the whole file in memory and cannot report a checksum, so the
writer is ours (the format is a length-prefixed JSON header followed by raw little-endian bytes). The
header needs only each tensor's dtype and shape, so `write_streamed` writes it first and then asks for
one tensor at a time: peak memory is the largest tensor, never a shard. Reading goes through
`savepoint.io.safetensors`, which never maps a file.
"""

from __future__ import annotations

import json
import queue
import struct
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import torch

from savepoint.errors import CorruptCheckpointError, Problem
from savepoint.io.safetensors import DTYPE_NAMES, open_path

__all__ = [
    "DTYPE_NAMES",
    "Layout",
    "build_header",
    "iter_safetensors",
    "read_header",
    "read_safetensors",
    "tensor_bytes",
    "write_safetensors",
    "write_streamed",
]

Layout = Mapping[str, tuple[torch.dtype, tuple[int, ...]]]  # name -> (dtype, shape), in file order
_ALIGN = 8
_WRITE_CHUNK = 8 * 1024 * 1024  # hashed, then written while still in the CPU cache


class BinaryWriter(Protocol):
    def write(self, data: bytes | bytearray | memoryview, /) -> int: ...


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a CPU tensor (one copy if it is not contiguous)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    array: Any = t.reshape(-1).view(torch.uint8).numpy()
    return memoryview(array)


def layout_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    return {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}


def build_header(layout: Layout | Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> bytes:
    """The length-prefixed JSON header for tensors of these dtypes and shapes, padded to 8 bytes.

    Takes a layout (name -> (dtype, shape)) or tensors (meta tensors will do)."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, spec in layout.items():
        dtype, shape = (spec.dtype, tuple(spec.shape)) if isinstance(spec, torch.Tensor) else spec
        if dtype not in DTYPE_NAMES:
            raise TypeError(f"tensor {name!r} has dtype {dtype}, which safetensors cannot store")
        nbytes = int(torch.Size(shape).numel()) * dtype.itemsize
        header[name] = {
            "dtype": DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % _ALIGN)
    return struct.pack("<Q", len(raw)) + raw


def write_streamed(
    out: BinaryWriter,
    layout: Layout,
    produce: Callable[[str], torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    on_tensor: Callable[[int], None] | None = None,
    on_written: Callable[[torch.Tensor], None] | None = None,
) -> int:
    """Write one safetensors file whose header is `layout`; `produce(name)` makes each tensor when its
    turn comes and it is dropped once written. `on_tensor(nbytes)` follows each; `on_written(tensor)`
    is called (on the writer thread) once a tensor's bytes are out, e.g. to recycle its buffer.
    Returns bytes written.

    A writer thread writes one tensor while the next is produced (the syscalls, the hash and torch
    release the GIL), so computing and the disk overlap; at most two produced tensors wait in memory.
    """
    header = build_header(layout, metadata)
    out.write(header)
    written = len(header)
    with _BackgroundWriter(out, on_written) as writer:
        for name, (dtype, shape) in layout.items():
            t = produce(name)
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(
                    f"tensor {name!r} came out as {t.dtype}{tuple(t.shape)}, not {dtype}{tuple(shape)}"
                )
            view = tensor_bytes(t)
            writer.put(view, t)
            written += view.nbytes
            if on_tensor is not None:
                on_tensor(view.nbytes)
            del t, view
    return written


class _BackgroundWriter:
    """Writes queued byte views to `out` in order on one thread; the first error is raised to the caller."""

    def __init__(self, out: BinaryWriter, on_written: Callable[[torch.Tensor], None] | None) -> None:
        self.out, self.on_written = out, on_written
        self.queue: queue.Queue[tuple[memoryview, torch.Tensor] | None] = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="savepoint-safetensors-writer", daemon=True)

    def __enter__(self) -> _BackgroundWriter:
        self.thread.start()
        return self

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue  # keep draining so the producer never blocks on a dead writer
            view, tensor = item
            del item
            try:
                # Cache-sized chunks: the hasher reads each one and the write copies it while it is hot
                # (an async save's recorder copies whole tensors instead: see async_writer.py).
                chunk = getattr(self.out, "write_chunk", _WRITE_CHUNK)
                for start in range(0, view.nbytes, chunk):
                    self.out.write(view[start : start + chunk])
                del view
                if self.on_written is not None:
                    self.on_written(tensor)
            except BaseException as exc:  # handed to the producer's thread
                self.error = exc
            del tensor

    def put(self, view: memoryview, tensor: torch.Tensor) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((view, tensor))

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None and exc_type is None:
            raise self.error


def write_safetensors(
    out: BinaryWriter, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> int:
    """Write `tensors` as one safetensors file to `out`; return the bytes written."""
    return write_streamed(out, layout_of(tensors), tensors.__getitem__, metadata)


def iter_safetensors(path: str, *, checkpoint: str, relpath: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of a (verified) safetensors file in file order, one tensor read at a time."""
    try:
        with open_path(path, root=checkpoint, relpath=relpath) as f:
            yield from f
    except (OSError, ValueError) as exc:
        raise CorruptCheckpointError(
            checkpoint, [Problem(relpath, f"not a readable safetensors file: {exc}")]
        ) from exc


def read_safetensors(path: str, *, checkpoint: str, relpath: str) -> dict[str, torch.Tensor]:
    """Load every tensor of a (verified) safetensors file; a malformed file is a CorruptCheckpointError."""
    return dict(iter_safetensors(path, checkpoint=checkpoint, relpath=relpath))


def read_header(path: str, *, checkpoint: str, relpath: str) -> dict[str, tuple[str, list[int]]]:
    """name -> (dtype name, shape) of a safetensors file, without reading tensor data."""
    try:
        with open_path(path, root=checkpoint, relpath=relpath) as f:
            return {k: (e.dtype_name, list(e.shape)) for k, e in f.entries.items()}
    except (OSError, ValueError) as exc:
        raise CorruptCheckpointError(
            checkpoint, [Problem(relpath, f"not a readable safetensors file: {exc}")]
        ) from exc
