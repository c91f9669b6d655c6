"""Streaming safetensors: write the header, then each tensor's bytes in order, hashing as we go.

safetensors' own `save_file` builds the whole file in memory and cannot report a checksum, so the
writer is ours (the format is a length-prefixed JSON header followed by raw little-endian bytes).
Reading always goes through the safetensors library itself.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any, Protocol

import torch
from safetensors import SafetensorError, safe_open

from savepoint.errors import CorruptCheckpointError, Problem

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
    torch.complex64: "C64",
}
_ALIGN = 8
_WRITE_CHUNK = 64 * 1024 * 1024


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


def build_header(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> bytes:
    """The length-prefixed JSON header for `tensors` in the given order, padded to 8 bytes."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in DTYPE_NAMES:
            raise TypeError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % _ALIGN)
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(
    out: BinaryWriter, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> int:
    """Write `tensors` as one safetensors file to `out`; return the bytes written."""
    header = build_header(tensors, metadata)
    out.write(header)
    written = len(header)
    for t in tensors.values():
        view = tensor_bytes(t)
        # Large tensors go out in chunks so the hasher and the page cache work on bounded pieces.
        for start in range(0, view.nbytes, _WRITE_CHUNK):
            out.write(view[start : start + _WRITE_CHUNK])
        written += view.nbytes
    return written


def read_safetensors(path: str, *, checkpoint: str, relpath: str) -> dict[str, torch.Tensor]:
    """Load every tensor of a (verified) safetensors file; a malformed file is a CorruptCheckpointError."""
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CorruptCheckpointError(
            checkpoint, [Problem(relpath, f"not a readable safetensors file: {exc}")]
        ) from exc


def read_header(path: str, *, checkpoint: str, relpath: str) -> dict[str, tuple[str, list[int]]]:
    """name -> (dtype name, shape) of a safetensors file, without reading tensor data."""
    try:
        with safe_open(path, framework="pt") as f:
            out = {}
            for k in f.keys():  # noqa: SIM118
                sl = f.get_slice(k)
                out[k] = (sl.get_dtype(), list(sl.get_shape()))
            return out
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CorruptCheckpointError(
            checkpoint, [Problem(relpath, f"not a readable safetensors file: {exc}")]
        ) from exc
