"""savepoint's safetensors reader against the library's own load: same bytes, same refusals, no mmap."""

from __future__ import annotations

import json
import mmap
import os
import struct
import subprocess
import sys
import textwrap

import pytest
import safetensors
import torch
from safetensors.torch import load_file, save_file

from savepoint.errors import CorruptCheckpointError, UnsafeCheckpointError
from savepoint.formats.safetensors_io import read_header, read_safetensors
from savepoint.io.safetensors import open_safetensors


def _odd_dtypes() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(5, 3, generator=g),
        "f64": torch.randn(4, generator=g, dtype=torch.float64),
        "f16": torch.randn(2, 3, generator=g).half(),
        "bf16": torch.randn(7, 9, generator=g).bfloat16(),
        "e4m3": (torch.randn(6, 2, generator=g) * 4).to(torch.float8_e4m3fn),
        "e5m2": (torch.randn(3, 3, generator=g) * 100).to(torch.float8_e5m2),
        "bool": torch.rand(11, generator=g) > 0.5,
        "i64": torch.tensor([-(2**62), -1, 0, 2**62 + 5]),
        "i32": torch.arange(-3, 6, dtype=torch.int32),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.arange(250, 256, dtype=torch.uint8),
        "empty": torch.empty(0, 4),
        "empty_bf16": torch.empty(3, 0, dtype=torch.bfloat16),
        "scalar": torch.tensor(3.25),
        "scalar_i64": torch.tensor(-7),
        "a.b.c.weight": torch.randn(1, 1, 1, 2, generator=g),
    }


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool(a.reshape(-1).view(torch.uint8).equal(b.reshape(-1).view(torch.uint8)))


def test_equals_the_library_load_byte_for_byte(tmp_path) -> None:
    path = str(tmp_path / "odd.safetensors")
    save_file(_odd_dtypes(), path, metadata={"format": "pt", "note": "x"})
    reference = load_file(path)

    ours = read_safetensors(path, checkpoint=str(tmp_path), relpath="odd.safetensors")

    assert sorted(ours) == sorted(reference)
    for name, t in reference.items():
        assert _same_bytes(ours[name], t), name
    with open_safetensors(str(tmp_path), "odd.safetensors") as f:
        assert f.metadata == {"format": "pt", "note": "x"}
    with safetensors.safe_open(path, framework="pt") as lib:
        names = list(lib.keys())
        expected_header = {
            k: (lib.get_slice(k).get_dtype(), list(lib.get_slice(k).get_shape())) for k in names
        }
    assert read_header(path, checkpoint=str(tmp_path), relpath="odd.safetensors") == expected_header


def test_no_mmap_path_equals_the_library_load(tmp_path, monkeypatch) -> None:
    """With every way of mapping a file broken, the reader still returns what the library loads."""
    path = str(tmp_path / "model.safetensors")
    save_file(_odd_dtypes(), path, metadata={"format": "pt"})
    reference = load_file(path)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the reader mapped or handed the file to safetensors")

    monkeypatch.setattr(mmap, "mmap", refuse)
    monkeypatch.setattr(safetensors, "safe_open", refuse)
    ours = read_safetensors(path, checkpoint=str(tmp_path), relpath="model.safetensors")
    for name, t in reference.items():
        assert _same_bytes(ours[name], t), name


_UNDER_A_SMALL_ADDRESS_SPACE = textwrap.dedent(
    """
    import hashlib, resource, sys
    import torch
    torch.set_num_threads(1)
    from savepoint.io.safetensors import open_safetensors
    import safetensors

    root, limit = sys.argv[1], int(sys.argv[2])
    with open("/proc/self/status") as f:
        vm = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + limit, resource.RLIM_INFINITY))
    try:
        with safetensors.safe_open(root + "/big.safetensors", framework="pt") as f:
            f.get_tensor("t0")
        print("LIB-OPENED")
    except Exception as exc:
        print("LIB-REFUSED", type(exc).__name__)
    digest = hashlib.sha256()
    with open_safetensors(root, "big.safetensors") as f:
        for name, t in f:
            digest.update(name.encode() + t.view(torch.uint8).numpy().tobytes())
    print("OURS", digest.hexdigest())
    """
)


def test_reads_a_file_larger_than_the_address_space_allows(tmp_path) -> None:
    """The 'bigger than RAM' case in miniature: a 96 MiB file under a 48 MiB address-space headroom.

    safetensors maps the whole file and is refused; the reader needs one tensor at a time."""
    import hashlib

    tensors = {f"t{i}": torch.full((1 << 20,), i, dtype=torch.float32) for i in range(24)}  # 4 MiB each
    save_file(tensors, str(tmp_path / "big.safetensors"))
    digest = hashlib.sha256()
    for name, t in load_file(str(tmp_path / "big.safetensors")).items():
        digest.update(name.encode() + t.view(torch.uint8).numpy().tobytes())
    del tensors

    done = subprocess.run(
        [sys.executable, "-c", _UNDER_A_SMALL_ADDRESS_SPACE, str(tmp_path), str(48 << 20)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "LIB-REFUSED" in done.stdout, "the limit is too loose to show anything"
    assert f"OURS {digest.hexdigest()}" in done.stdout


# ---------------------------------------------------------------- hostile headers: refused like the library


def _raw(header: object, data: bytes, claimed: int | None = None) -> bytes:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(body) if claimed is None else claimed) + body + data


def _entry(dtype: str, shape: list[int], start: int, end: int) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


HOSTILE = {
    "length-past-end": _raw({"a": _entry("F32", [2], 0, 8)}, b"\0" * 8, claimed=10_000),
    "length-huge": _raw({"a": _entry("F32", [2], 0, 8)}, b"\0" * 8, claimed=2**64 - 1),
    "too-short": b"\x05\0\0",
    "not-an-object": _raw(b"[1, 2]  ", b""),
    "not-json": _raw(b"{nope    ", b""),
    "not-utf8": _raw(b'{"\xff": 1}', b""),
    "shape-vs-bytes": _raw({"a": _entry("F32", [8, 4], 0, 16)}, b"\0" * 16),
    "huge-shape": _raw({"a": _entry("F32", [2**31, 2**31], 0, 16)}, b"\0" * 16),
    "offset-past-end": _raw({"a": _entry("F32", [4], 0, 16)}, b"\0" * 8),
    "overlap": _raw({"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 4, 12)}, b"\0" * 12),
    "gap": _raw({"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 12, 20)}, b"\0" * 20),
    "trailing-bytes": _raw({"a": _entry("F32", [2], 0, 8)}, b"\0" * 12),
    "reversed-offsets": _raw({"a": _entry("U8", [0], 8, 0)}, b"\0" * 8),
    "negative-dim": _raw({"a": _entry("F32", [-2], 0, 8)}, b"\0" * 8),
    "unknown-dtype": _raw({"a": _entry("F13", [2], 0, 8)}, b"\0" * 8),
    "metadata-not-strings": _raw({"__metadata__": {"x": 1}, "a": _entry("F32", [2], 0, 8)}, b"\0" * 8),
    "duplicate-name": _raw(
        b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
        b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}',
        b"\0" * 8,
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_malformed_files_are_refused_naming_the_file(tmp_path, case: str) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(HOSTILE[case])
    for read in (read_header, read_safetensors):
        with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors"):
            read(str(path), checkpoint=str(tmp_path), relpath="model.safetensors")
    if case not in ("duplicate-name", "metadata-not-strings"):  # the library accepts these two
        with pytest.raises(Exception):  # noqa: B017 (the library's errors vary by case)
            load_file(str(path))


def test_symlinks_and_fifos_are_not_opened(tmp_path) -> None:
    save_file({"a": torch.zeros(2)}, str(tmp_path / "real.safetensors"))
    os.symlink(tmp_path / "real.safetensors", tmp_path / "link.safetensors")
    os.mkfifo(tmp_path / "fifo.safetensors")
    for name in ("link.safetensors", "fifo.safetensors"):
        with pytest.raises(UnsafeCheckpointError):
            read_safetensors(str(tmp_path / name), checkpoint=str(tmp_path), relpath=name)


def test_a_file_that_shrinks_after_opening_is_refused(tmp_path) -> None:
    save_file({"a": torch.zeros(1024), "b": torch.ones(1024)}, str(tmp_path / "m.safetensors"))
    with open_safetensors(str(tmp_path), "m.safetensors") as f:
        os.truncate(tmp_path / "m.safetensors", os.path.getsize(tmp_path / "m.safetensors") - 100)
        last = max(f.entries.values(), key=lambda e: e.start).name
        with pytest.raises(CorruptCheckpointError, match="ends at byte"):
            f.read(last)
