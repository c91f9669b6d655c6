"""Direct I/O (savepoint.io.direct): the same bytes as plain I/O, read and written around the page cache."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import xxhash
from safetensors.torch import load_file, save_file
from tests.helpers.lora_models import make_adapter, save_base
from tests.io.test_safetensors_reader import _odd_dtypes, _same_bytes

import savepoint.io.direct as direct
from savepoint.errors import CorruptCheckpointError
from savepoint.formats.safetensors_io import read_safetensors
from savepoint.io.direct import DirectFile, OverlappedWriter, open_for_write
from savepoint.io.safetensors import open_safetensors
from savepoint.storage.local import StagedDir


def _supports_o_direct(directory: str) -> bool:
    path = os.path.join(directory, ".probe")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_DIRECT", 0), 0o600)
    except OSError:
        return False
    os.close(fd)
    os.unlink(path)
    return hasattr(os, "O_DIRECT")


@pytest.fixture
def opened_direct(tmp_path, monkeypatch) -> list[int]:
    """Every O_DIRECT descriptor opened (skips where the file system refuses O_DIRECT)."""
    if not _supports_o_direct(str(tmp_path)):
        pytest.skip("this file system refuses O_DIRECT")
    opened: list[int] = []
    real = direct.reopen_direct

    def spy(fd: int, flags: int) -> int | None:
        got = real(fd, flags)
        if got is not None:
            opened.append(flags)
        return got

    monkeypatch.setattr(direct, "reopen_direct", spy)
    return opened


def test_direct_reads_equal_the_library_load(tmp_path, monkeypatch, opened_direct) -> None:
    """Every tensor whose offset allows it is read through an aligned O_DIRECT window."""
    tensors = _odd_dtypes()
    tensors["big"] = torch.randn(3 * 4096 + 7, generator=torch.Generator().manual_seed(3))  # several blocks
    path = str(tmp_path / "model.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    reference = load_file(path)
    monkeypatch.setattr(direct, "MIN_DIRECT_BYTES", 1)

    with open_safetensors(str(tmp_path), "model.safetensors", direct=True) as f:
        ours = dict(iter(f))
    assert read_safetensors(path, checkpoint=str(tmp_path), relpath="model.safetensors")  # not direct

    assert opened_direct == [os.O_RDONLY], "the reader did not go around the page cache"
    assert sorted(ours) == sorted(reference)
    for name, t in reference.items():
        assert _same_bytes(ours[name], t), name


def test_a_direct_read_past_the_end_of_a_shrunk_file_is_refused(tmp_path, monkeypatch, opened_direct) -> None:
    save_file({"a": torch.zeros(4096), "b": torch.ones(4096)}, str(tmp_path / "m.safetensors"))
    monkeypatch.setattr(direct, "MIN_DIRECT_BYTES", 1)
    with open_safetensors(str(tmp_path), "m.safetensors", direct=True) as f:
        os.truncate(tmp_path / "m.safetensors", os.path.getsize(tmp_path / "m.safetensors") - 100)
        with pytest.raises(CorruptCheckpointError, match="ends at byte"):
            f.read("b")
    assert opened_direct


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 8192 + 5])
def test_overlapped_direct_writes_write_the_bytes_they_are_given(tmp_path, opened_direct, size: int) -> None:
    data = os.urandom(size)
    with open_for_write(str(tmp_path / "out.bin"), direct=True) as f:
        assert isinstance(f, DirectFile) and f.direct
        out = OverlappedWriter(f, buffer_bytes=8192)
        assert out.direct
        for start in range(0, size, 3000):  # writes that straddle the buffer's end
            out.write(memoryview(data)[start : start + 3000])
        out.finish()
        out.close()
        f.flush()
    assert (tmp_path / "out.bin").read_bytes() == data


@pytest.mark.parametrize("refused", [False, True])
def test_staged_direct_create_records_the_checksum_of_what_it_wrote(
    tmp_path, monkeypatch, refused: bool
) -> None:
    if refused:
        monkeypatch.setattr(direct, "_O_DIRECT", 0)  # plain writes instead
    data = os.urandom((9 << 20) + 123)  # a partial block at the end
    staged = StagedDir(str(tmp_path), "out")
    with staged.create("w.bin", direct=True) as out:
        out.write(data[:100])
        out.write(data[100:])
    with open(os.path.join(staged.path, "w.bin"), "rb") as f:
        written = f.read()
    assert written == data
    assert staged.entries["w.bin"] == (len(data), xxhash.xxh3_128(data).hexdigest())
    staged.abort()


def test_merge_through_direct_reads_equals_the_plain_merge(tmp_path, monkeypatch, opened_direct) -> None:
    """Aligned windows in recycled buffers feed the merge: the output is byte for byte the plain one."""
    from savepoint.lora import merge_lora

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = save_base("llama", str(tmp_path / "base"))
        make_adapter("llama", base, str(tmp_path / "adapter"), target_modules="all-linear")
    with monkeypatch.context() as plain_io:
        plain_io.setattr(direct, "reopen_direct", lambda fd, flags: None)
        plain_io.setattr(direct, "_O_DIRECT", 0)
        merge_lora(str(tmp_path / "adapter"), base=base, out=str(tmp_path / "plain"))
    written_direct: list[bool] = []

    class SpyFile(direct.DirectFile):
        def __init__(self, fd: int, **kwargs: int) -> None:
            super().__init__(fd, **kwargs)
            written_direct.append(self.direct)

    monkeypatch.setattr(direct, "DirectFile", SpyFile)
    monkeypatch.setattr(direct, "MIN_DIRECT_BYTES", 1)
    merge_lora(str(tmp_path / "adapter"), base=base, out=str(tmp_path / "direct"))

    assert os.O_RDONLY in opened_direct and written_direct and all(written_direct)
    for name in sorted(os.listdir(tmp_path / "plain")):
        if name.endswith(".safetensors"):
            assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "direct" / name).read_bytes()


@pytest.mark.parametrize("how", ["refused at open", "refused at read"])
def test_direct_reads_fall_back_to_plain_reads(tmp_path, monkeypatch, how: str) -> None:
    """A file system that refuses O_DIRECT (at open, or with EINVAL at the first read) still reads right."""
    import errno

    path = str(tmp_path / "model.safetensors")
    save_file(_odd_dtypes(), path)
    reference = load_file(path)
    monkeypatch.setattr(direct, "MIN_DIRECT_BYTES", 1)
    if how == "refused at open":
        monkeypatch.setattr(direct, "reopen_direct", lambda fd, flags: None)
    else:
        real_preadv, direct_fds = os.preadv, set()

        def reopen(fd: int, flags: int) -> int:
            got = os.open(f"/proc/self/fd/{fd}", flags)  # a plain twin standing in for the O_DIRECT one
            direct_fds.add(got)
            return got

        def preadv(fd, buffers, offset, *args):  # type: ignore[no-untyped-def]
            if fd in direct_fds:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_preadv(fd, buffers, offset, *args)

        monkeypatch.setattr(direct, "reopen_direct", reopen)
        monkeypatch.setattr(os, "preadv", preadv)
    with open_safetensors(str(tmp_path), "model.safetensors", direct=True) as f:
        ours = dict(iter(f))
    for name, t in reference.items():
        assert _same_bytes(ours[name], t), name
