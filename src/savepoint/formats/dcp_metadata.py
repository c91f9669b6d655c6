"""torch DCP's `.metadata` read without letting its bytes run code or point anywhere they should not.

DCP stores its index (every tensor's shape, dtype and chunks, and where each chunk's bytes lie) as a
pickle. A checkpoint may come from someone who controls every byte and recomputes every checksum
(DESIGN.md promise 4), so savepoint never hands that file to `pickle.load`. It reads it in two steps:

1. An allow-list unpickler that constructs nothing real: every global the pickle names must be one of
   DCP's own metadata records (or `torch.Size`, a dtype, a layout, a path), and each becomes an inert
   `_Record` holding the arguments and state the pickle gave it. No `__init__`, `__setstate__` or
   `__reduce__` of any real class runs on the file's data; anything else is refused unread.
2. A validator that walks those records by their known fields and builds DCP's own `Metadata` from
   plain, checked values: byte items (which torch's load planner would `torch.load` with
   `weights_only=False`) are refused; every storage entry must name a file directly inside the DCP
   directory that the caller vouches for, lie within that file's size, carry no stream transforms, and
   overlap no other entry; every chunk must lie inside its tensor, be backed by at least its own bytes,
   and the chunks of a tensor must add up to exactly its size. So no tensor savepoint allocates from a
   claimed shape can be larger than the bytes on disk.

Why this and not a JSON copy of the layout written at save time: a bare DCP directory from another
tool (`savepoint consolidate --trust-dcp-metadata`) and every savepoint checkpoint already on disk
have only the pickle, so an allow-list reader is needed in any case; one reader then serves all of
them, and there is no second description that could disagree with the one DCP wrote. Records are
matched by field name and rebuilt through DCP's public constructors, so layouts written by older torch
versions (TensorProperties pickled as a dict or a tuple, the old `_shard` module paths) read the same.
"""

from __future__ import annotations

import io
import itertools
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from savepoint.errors import CorruptCheckpointError, Problem, UnsafeCheckpointError

MAX_METADATA_BYTES = 512 * 1024 * 1024  # DCP's index of a 1,000-rank run of a large model is ~100 MB
MAX_NDIM = 64
MAX_NAME = 4096

_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in (
        *("float64", "float32", "float16", "bfloat16", "complex64", "complex128", "bool"),
        *("int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "uint64"),
        *("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"),
    )
    if isinstance(getattr(torch, name, None), torch.dtype)
}

_CKPT = "torch.distributed.checkpoint"
_OLD_SHARD = "torch.distributed._shard.sharded_tensor.metadata"
# (module, name) a pickle may name -> the kind of inert record it becomes.
_ALLOWED: dict[tuple[str, str], str] = {
    (f"{_CKPT}.metadata", "Metadata"): "Metadata",
    (f"{_CKPT}.metadata", "TensorStorageMetadata"): "TensorStorageMetadata",
    (f"{_CKPT}.metadata", "BytesStorageMetadata"): "BytesStorageMetadata",
    (f"{_CKPT}.metadata", "ChunkStorageMetadata"): "ChunkStorageMetadata",
    (f"{_CKPT}.metadata", "TensorProperties"): "TensorProperties",
    (_OLD_SHARD, "TensorProperties"): "TensorProperties",
    (f"{_CKPT}.metadata", "_MEM_FORMAT_ENCODING"): "MemoryFormat",
    (_OLD_SHARD, "MEM_FORMAT_ENCODING"): "MemoryFormat",
    (f"{_CKPT}.metadata", "MetadataIndex"): "MetadataIndex",
    (f"{_CKPT}.metadata", "StorageMeta"): "StorageMeta",
    (f"{_CKPT}.filesystem", "_StorageInfo"): "StorageInfo",
    ("torch", "Size"): "Size",
    ("torch.serialization", "_get_layout"): "Layout",
    ("pathlib", "PosixPath"): "Path",
    ("pathlib", "WindowsPath"): "Path",
    ("pathlib", "PurePosixPath"): "Path",
    ("pathlib", "PureWindowsPath"): "Path",
    ("pathlib._local", "PosixPath"): "Path",
    ("pathlib._local", "WindowsPath"): "Path",
}


class _Record:
    """An inert stand-in for one object of the pickle: the arguments and state the pickle gave it."""

    kind = ""

    def __new__(cls, *args: Any) -> _Record:
        record = object.__new__(cls)
        record.args = args
        record.state = None
        return record

    def __init__(self, *args: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    args: tuple[Any, ...]
    state: Any


_RECORD_TYPES: dict[str, type[_Record]] = {
    kind: type(f"_{kind}Record", (_Record,), {"kind": kind, "__slots__": ()})
    for kind in set(_ALLOWED.values())
}


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, refuse: Callable[[str], Exception]) -> None:
        super().__init__(io.BytesIO(data))
        self._refuse = refuse

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]  # a value: calling it or building from it fails
        if (module, name) == ("torch", "strided"):
            return "torch.strided"
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        kind = _ALLOWED.get((module, name))
        if kind is None:
            raise self._refuse(f"{module}.{name}"[:200])
        return _RECORD_TYPES[kind]

    def persistent_load(self, pid: Any) -> Any:
        raise self._refuse("a persistent id")


@dataclass(frozen=True)
class StorageEntry:
    """Where one chunk's bytes lie (duck-types DCP's private `_StorageInfo`, which its reader reads)."""

    relative_path: str
    offset: int
    length: int
    transform_descriptors: None = None


def parse_metadata(data: bytes, file_sizes: Mapping[str, int], *, checkpoint: str, relpath: str) -> Any:
    """DCP's `Metadata` for the `.metadata` bytes `data`, every claim checked (see the module docstring).

    `file_sizes` maps the names of the DCP directory's data files that the caller vouches for (listed
    in a verified manifest, or opened safely) to their sizes. Raises UnsafeCheckpointError for what
    would run code or reach outside, CorruptCheckpointError for anything else malformed.
    """

    def refuse(what: str) -> UnsafeCheckpointError:
        return UnsafeCheckpointError(
            checkpoint,
            [Problem(relpath, f"the pickle names {what}, which is not one of DCP's metadata records")],
            hint="savepoint reads DCP metadata through an allow-list and never unpickles anything else",
        )

    try:
        root = _AllowListUnpickler(data, refuse).load()
    except UnsafeCheckpointError:
        raise
    except Exception as exc:  # any malformed pickle: wrong opcodes, records called wrongly, truncation
        raise CorruptCheckpointError(
            checkpoint,
            [Problem(relpath, f"not a readable DCP metadata file ({type(exc).__name__}: {exc})"[:300])],
        ) from exc
    return _Builder(checkpoint, relpath, file_sizes).metadata(root)


class _Builder:
    """Walks the records by their known fields and builds DCP's objects from checked plain values."""

    def __init__(self, checkpoint: str, relpath: str, file_sizes: Mapping[str, int]) -> None:
        self.checkpoint, self.relpath, self.file_sizes = checkpoint, relpath, file_sizes

    def fail(self, reason: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(self.checkpoint, [Problem(self.relpath, reason[:400])])

    def fields(self, value: Any, kind: str, what: str) -> dict[str, Any]:
        if not isinstance(value, _Record) or value.kind != kind:
            raise self.fail(f"{what} should be a DCP {kind}, found {type(value).__name__}")
        if not isinstance(value.state, dict) or not all(isinstance(k, str) for k in value.state):
            raise self.fail(f"{what}: malformed {kind} record")
        return value.state

    def size(self, value: Any, what: str) -> torch.Size:
        if isinstance(value, _Record) and value.kind == "Size" and len(value.args) == 1:
            dims = value.args[0]
            if (
                isinstance(dims, tuple | list)
                and len(dims) <= MAX_NDIM
                and all(type(d) is int and 0 <= d < 2**62 for d in dims)
            ):
                return torch.Size(dims)
        raise self.fail(f"{what} is not a valid torch.Size")

    def name(self, value: Any, what: str) -> str:
        if not isinstance(value, str) or not value or len(value) > MAX_NAME or "\x00" in value:
            raise self.fail(f"{what} is not a valid name")
        return value

    def metadata(self, root: Any) -> Any:
        from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

        fields = self.fields(root, "Metadata", "the file")
        tensors = self.tensors(fields.get("state_dict_metadata"))
        storage = self.storage(fields.get("storage_data"), tensors)
        version = fields.get("version")
        if version is not None and not (isinstance(version, str) and len(version) < 64):
            raise self.fail("malformed version")
        return Metadata(
            state_dict_metadata=dict(tensors),
            planner_data=self.planner_data(fields.get("planner_data"), tensors),
            storage_data=storage,
            storage_meta=StorageMeta(),
            version=version,
        )

    def tensors(self, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail("state_dict_metadata is not a mapping")
        out = {}
        for key, entry in value.items():
            fqn = self.name(key, "a state dict key")
            if isinstance(entry, _Record) and entry.kind == "BytesStorageMetadata":
                raise UnsafeCheckpointError(
                    self.checkpoint,
                    [Problem(self.relpath, f"declares {fqn!r:.200} as a byte item")],
                    hint="torch's DCP loader unpickles byte items with weights_only=False; savepoint never "
                    "writes them and refuses any checkpoint that declares one, before DCP is called",
                )
            out[fqn] = self.tensor(entry, fqn)
        return out

    def tensor(self, value: Any, fqn: str) -> Any:
        from torch.distributed.checkpoint.metadata import (
            ChunkStorageMetadata,
            TensorProperties,
            TensorStorageMetadata,
        )

        fields = self.fields(value, "TensorStorageMetadata", f"{fqn!r:.200}")
        dtype = self.dtype(fields.get("properties"), fqn)
        size = self.size(fields.get("size"), f"size of {fqn!r:.200}")
        chunks_in = fields.get("chunks")
        if not isinstance(chunks_in, list) or not chunks_in:
            raise self.fail(f"{fqn!r:.200} has no chunks")
        chunks, volume = [], 0
        for chunk in chunks_in:
            cf = self.fields(chunk, "ChunkStorageMetadata", f"a chunk of {fqn!r:.200}")
            offsets = self.size(cf.get("offsets"), f"chunk offsets of {fqn!r:.200}")
            sizes = self.size(cf.get("sizes"), f"chunk sizes of {fqn!r:.200}")
            if len(offsets) != len(size) or len(sizes) != len(size):
                raise self.fail(f"a chunk of {fqn!r:.200} has {len(offsets)} dims, the tensor {len(size)}")
            if any(o + s > d for o, s, d in zip(offsets, sizes, size, strict=True)):
                raise self.fail(
                    f"chunk at {list(offsets)} of {fqn!r:.200} reaches outside the tensor {list(size)}"
                )
            volume += sizes.numel()
            chunks.append(ChunkStorageMetadata(offsets=offsets, sizes=sizes))
        if volume != size.numel():
            raise self.fail(
                f"the chunks of {fqn!r:.200} hold {volume} elements, its size {list(size)} needs {size.numel()}"
            )
        return TensorStorageMetadata(properties=TensorProperties(dtype=dtype), size=size, chunks=chunks)

    def dtype(self, value: Any, fqn: str) -> torch.dtype:
        if isinstance(value, _Record) and value.kind == "TensorProperties":
            state = value.state
            dtype = state[0] if isinstance(state, tuple) and state else None
            if isinstance(state, dict):
                dtype = state.get("dtype")
            if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
                return dtype
        raise self.fail(f"{fqn!r:.200} has no supported dtype")

    def storage(self, value: Any, tensors: Mapping[str, Any]) -> dict[Any, StorageEntry]:
        from torch.distributed.checkpoint.metadata import MetadataIndex

        if not isinstance(value, dict):
            raise self.fail("storage_data is not a mapping")
        # (fqn, chunk offsets) -> (chunk index, bytes the chunk needs at least), for chunks holding data;
        # an empty chunk (a rank whose shard of an unevenly split tensor is empty) needs no entry.
        wanted: dict[tuple[str, tuple[int, ...]], tuple[int, int]] = {}
        empty: dict[tuple[str, tuple[int, ...]], tuple[int, int]] = {}
        for fqn, t in tensors.items():
            for i, c in enumerate(t.chunks):
                into = wanted if c.sizes.numel() else empty
                if (fqn, tuple(c.offsets)) in wanted or (fqn, tuple(c.offsets)) in into:
                    raise self.fail(f"two chunks of {fqn!r:.200} start at {list(c.offsets)}")
                into[(fqn, tuple(c.offsets))] = (i, c.sizes.numel() * t.properties.dtype.itemsize)
        out: dict[Any, StorageEntry] = {}
        spans: dict[str, list[tuple[int, int]]] = {}
        for key, info in value.items():
            kf = self.fields(key, "MetadataIndex", "a storage key")
            fqn = self.name(kf.get("fqn"), "a storage key's tensor name")
            offset = self.size(kf.get("offset"), f"a storage key's offset for {fqn!r:.200}")
            found = wanted.pop((fqn, tuple(offset)), None) or empty.pop((fqn, tuple(offset)), None)
            if found is None:
                raise self.fail(f"a storage entry for {fqn!r:.200} at {list(offset)} matches no chunk")
            entry = self.entry(info, fqn)
            if entry.length < found[1]:
                raise self.fail(
                    f"the chunk of {fqn!r:.200} at {list(offset)} needs {found[1]} bytes, its entry has {entry.length}"
                )
            spans.setdefault(entry.relative_path, []).append((entry.offset, entry.offset + entry.length))
            out[MetadataIndex(fqn, offset, found[0])] = entry
        if wanted:
            fqn, first = next(iter(wanted))
            raise self.fail(f"no storage entry for the chunk of {fqn!r:.200} at {list(first)}")
        for name, ranges in spans.items():
            ranges.sort()
            for (_, end), (start, _) in itertools.pairwise(ranges):
                if start < end:
                    raise self.fail(f"two storage entries overlap in {name!r:.200}")
        return out

    def entry(self, value: Any, fqn: str) -> StorageEntry:
        fields = self.fields(value, "StorageInfo", f"the storage entry of {fqn!r:.200}")
        name, offset, length = fields.get("relative_path"), fields.get("offset"), fields.get("length")
        if not isinstance(name, str) or type(offset) is not int or type(length) is not int:
            raise self.fail(f"malformed storage entry for {fqn!r:.200}")
        if fields.get("transform_descriptors"):
            raise UnsafeCheckpointError(
                self.checkpoint,
                [Problem(self.relpath, f"the entry of {fqn!r:.200} asks for stream transforms")],
                hint="savepoint writes DCP data without transforms and refuses those that declare one",
            )
        if name in ("", ".", "..") or "/" in name or "\\" in name or "\x00" in name or name == ".metadata":
            raise UnsafeCheckpointError(
                self.checkpoint,
                [
                    Problem(
                        self.relpath, f"a storage entry names {name!r:.200}, not a file of the DCP directory"
                    )
                ],
            )
        size = self.file_sizes.get(name)
        if size is None:
            raise UnsafeCheckpointError(
                self.checkpoint,
                [
                    Problem(
                        self.relpath, f"a storage entry names {name!r:.200}, which the manifest does not list"
                    )
                ],
            )
        if offset < 0 or length < 0 or offset + length > size:
            raise self.fail(
                f"the entry of {fqn!r:.200} spans bytes {offset}..{offset + length} of {name!r:.200}, "
                f"which has {size}"
            )
        return StorageEntry(name, offset, length)

    def planner_data(self, value: Any, tensors: Mapping[str, Any]) -> dict[str, tuple[Any, ...]] | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.fail("planner_data is not a mapping")
        out = {}
        for key, path in value.items():
            if key not in tensors:
                continue  # an entry of a key that holds no tensor: DCP never needs it here
            if not isinstance(path, tuple | list) or not all(
                (isinstance(p, str) and len(p) <= MAX_NAME) or type(p) is int for p in path
            ):
                raise self.fail(f"malformed planner_data for {key!r:.200}")
            out[key] = tuple(path)
        return out
