"""O_DIRECT writes (io/direct.py): the async writers' files hold exactly the bytes a buffered write
leaves, whatever the alignment of the caller's memory and of the file offsets."""

from __future__ import annotations

import hashlib
import os
import random
import threading

import numpy as np
import pytest
import torch

import savepoint
from savepoint.io.direct import ALIGN, DirectFile, direct_writes, open_for_write
from savepoint.io.shared_arena import SharedArena
from savepoint.manifest import build_manifest
from savepoint.storage import dedupe
from savepoint.storage.dedupe import DedupingStagedDir


def _pieces(data: bytes, rng: random.Random, aligned_copy: bool) -> list[memoryview]:
    """`data` cut at random sizes (tiny, block-sized, large); some pieces copied to page-aligned memory."""
    out, i = [], 0
    while i < len(data):
        n = rng.choice([1, 7, 100, ALIGN - 1, ALIGN, ALIGN + 3, 3 * ALIGN, 70_000, 1 << 20])
        piece = data[i : i + n]
        if aligned_copy and rng.random() < 0.5:
            raw = np.empty(len(piece) + 2 * ALIGN, dtype=np.uint8)
            shift = (-raw.ctypes.data) % ALIGN + rng.choice([0, 0, 8, 100])
            raw[shift : shift + len(piece)] = np.frombuffer(piece, dtype=np.uint8)
            out.append(memoryview(raw[shift : shift + len(piece)]))
        else:
            out.append(memoryview(piece))
        i += n
    return out


@pytest.mark.parametrize("seed", range(4))
def test_a_direct_file_holds_exactly_the_bytes_written(tmp_path, seed):
    rng = random.Random(seed)
    data = rng.randbytes(rng.choice([0, 5, ALIGN, 3 << 20, (9 << 20) + 123]))
    path = str(tmp_path / "f.bin")
    with direct_writes():
        f = open_for_write(path)
    assert isinstance(f, DirectFile)
    with f:
        for i, piece in enumerate(_pieces(data, rng, aligned_copy=True)):
            f.write(piece)
            if i % 5 == 0:
                f.flush()  # a flush in the middle writes the tail padded; the next writes go on from it
        f.flush()
        os.fsync(f.fileno())
    with open(path, "rb") as g:
        assert g.read() == data


def test_a_direct_file_may_start_after_bytes_already_in_the_file(tmp_path):
    path = str(tmp_path / "f.bin")
    head = os.urandom(ALIGN * 2 + 77)
    with open(path, "wb") as g:
        g.write(head[: ALIGN * 2])  # what the dedupe writer copied from the parent: a whole number of blocks
    rest = os.urandom(5 << 20)
    with DirectFile(os.open(path, os.O_WRONLY), start=ALIGN * 2) as f:
        f.write(head[ALIGN * 2 :])
        f.write(rest)
        f.flush()
    with open(path, "rb") as g:
        assert g.read() == head + rest


def test_outside_direct_writes_files_are_buffered_and_tmpfs_falls_back(tmp_path):
    assert not isinstance(open_for_write(str(tmp_path / "plain")), DirectFile)
    shm = "/dev/shm"
    if not os.path.isdir(shm):
        pytest.skip("no /dev/shm")
    path = os.path.join(shm, f"savepoint-direct-test-{os.getpid()}")
    try:
        with direct_writes():
            f = open_for_write(path)
        data = os.urandom(3 * ALIGN + 5)
        with f:
            f.write(data)
            f.flush()
        with open(path, "rb") as g:
            assert g.read() == data
    finally:
        os.unlink(path)


def test_direct_writes_are_per_thread():
    seen = []
    with direct_writes():
        t = threading.Thread(target=lambda: seen.append(isinstance(open_for_write(os.devnull), DirectFile)))
        t.start()
        t.join()
    assert seen == [False]


def test_the_arena_lays_bytes_out_congruent_to_their_file_offsets():
    arena = SharedArena(lambda fd, size: None)
    arena.begin(1 << 20)
    for file_offset, n in [(0, 100), (8 + 1234, 70_000), (8 + 1234 + 70_000, 900_000), (17, 3 << 20)]:
        _segment, offset, nbytes = arena.put(memoryview(os.urandom(n)), file_offset=file_offset)
        assert (offset - file_offset) % ALIGN == 0
        assert nbytes == n
    arena.close()


def test_an_async_save_with_a_changed_parent_file_verifies_and_matches_a_sync_save(tmp_path):
    """Dedupe's divergence path (the prefix equal to the parent's is copied, the rest written direct)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(300, 700), torch.nn.Linear(700, 5))
    for mode in (False, True, "process"):
        root = str(tmp_path / str(mode))
        with savepoint.CheckpointManager(root, async_save=mode) as mgr:
            for step in (1, 2):
                with torch.no_grad():
                    model[1].weight.add_(1.0)  # the last tensor changes, the first bytes do not
                mgr.save(step, model=model)
            mgr.wait()
        with torch.no_grad():
            model[1].weight.sub_(2.0)
    digests = {}
    for mode in (False, True, "process"):
        ckpt = str(tmp_path / str(mode) / "step-00000002")
        assert savepoint.verify(ckpt)
        with open(os.path.join(ckpt, "model.safetensors"), "rb") as f:
            digests[mode] = hashlib.sha256(f.read()).hexdigest()
    assert len(set(digests.values())) == 1


def test_a_dedupe_writer_diverging_mid_file_under_direct_writes(tmp_path):
    root = str(tmp_path)
    same = os.urandom(3 * ALIGN + 11)
    first = DedupingStagedDir(root, "step-00000001")
    with first.create("a.bin") as out:
        out.write(same + b"old" * 1000)
    first.commit(build_manifest("module", first.entries, step=1).to_json())
    with direct_writes():
        second = DedupingStagedDir(root, "step-00000002", previous="step-00000001")
        with second.create("a.bin") as out:
            out.write(same[:100])
            out.write(same[100:] + b"new" * 1000)
        second.commit(build_manifest("module", second.entries, step=2).to_json())
    with open(os.path.join(root, "step-00000002", "a.bin"), "rb") as f:
        assert f.read() == same + b"new" * 1000
    assert savepoint.verify(os.path.join(root, "step-00000002"))


def test_the_thread_writer_writes_a_changed_file_direct_even_from_the_safetensors_helper_thread(
    tmp_path, monkeypatch
):
    made = []

    class Counted(DirectFile):
        def __init__(self, fd: int, *, start: int = 0) -> None:
            made.append(threading.current_thread().name)
            super().__init__(fd, start=start)

    monkeypatch.setattr(dedupe, "DirectFile", Counted)
    model = torch.nn.Linear(200, 300)
    with savepoint.CheckpointManager(str(tmp_path), async_save=True) as mgr:
        mgr.save(1, model=model)
        mgr.wait()
        with torch.no_grad():
            model.weight.add_(1.0)
        mgr.save(2, model=model)  # diverges from step 1 on the safetensors writer's helper thread
        mgr.wait()
    assert made, "the changed file was written through the page cache"
    assert savepoint.verify(str(tmp_path / "step-00000002"))
