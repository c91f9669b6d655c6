"""async_save="process": a writer process fed from shared memory writes what a synchronous save writes."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import time

import pytest
import torch
from tests.async_save.helpers import clone_state, mutate, trained_llama

import savepoint
from savepoint.async_writer import BackgroundSaveError
from savepoint.io.shared_arena import SharedArena
from savepoint.manifest import find_problems, read_manifest


def _writer(mgr: savepoint.CheckpointManager):  # type: ignore[no-untyped-def]
    return mgr._writer


def test_process_save_writes_the_same_files_as_a_sync_save(tmp_path):
    model, opt = trained_llama()
    sync = savepoint.CheckpointManager(tmp_path / "sync")
    sync.save(3, model=model, optimizer=opt, metrics={"loss": 1.5})
    with savepoint.CheckpointManager(tmp_path / "proc", async_save="process") as mgr:
        path = mgr.save(3, model=model, optimizer=opt, metrics={"loss": 1.5})
        mutate(model, opt)  # training goes on at once: the snapshot must not see this
        mgr.wait()
        assert find_problems(path) == []
    ours, theirs = read_manifest(path), read_manifest(sync.checkpoints[-1].path)
    rng = [f for f in ours.files if "/rng/" in f]  # the RNG advanced between the saves
    assert {f: e for f, e in ours.files.items() if f not in rng} == {
        f: e for f, e in theirs.files.items() if f not in rng
    }
    assert ours.step == 3 and ours.metrics == {"loss": 1.5}


def test_restore_gets_the_state_at_save_time_not_later(tmp_path):
    model, opt = trained_llama()
    expected = clone_state(model, opt)
    mgr = savepoint.CheckpointManager(tmp_path / "run", async_save="process")
    mgr.save(1, model=model, optimizer=opt)
    mutate(model, opt)
    mgr.wait()
    fresh, fresh_opt = trained_llama(steps=0)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    assert mgr.restore(model=fresh, optimizer=fresh_opt).step == 1
    got = clone_state(fresh, fresh_opt)
    assert all(torch.equal(expected["weights"][k], v) for k, v in got["weights"].items())
    assert expected["moments"].keys() == got["moments"].keys()
    assert all(torch.equal(expected["moments"][k], v) for k, v in got["moments"].items())
    mgr.close()


def _state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    tensors = list(model.state_dict().values())
    tensors += [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _mlp(width: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Linear(width, width))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, width)).sum().backward()
    opt.step()
    return model, opt


def test_shared_memory_is_one_state_large_and_reused_not_grown_across_many_saves(tmp_path):
    model, opt = _mlp(512)
    state = _state_bytes(model, opt)  # 3.1 MB: weights and two moments
    mgr = savepoint.CheckpointManager(tmp_path / "run", async_save="process", keep_last=2)
    writer = _writer(mgr)
    mgr.save(1, model=model, optimizer=opt)
    mgr.wait()
    held, segments = writer.snapshot_bytes, writer._arena.segments
    # One segment of the state's size: each tensor may add a block of alignment, nothing doubles.
    assert segments == 1
    assert state <= held <= state + 64 * 4096
    fds = len(os.listdir("/proc/self/fd"))
    child_fds = len(os.listdir(f"/proc/{writer.pid}/fd"))
    for step in range(2, 202):
        mutate(model, opt)
        mgr.save(step, model=model, optimizer=opt)
    mgr.wait()
    assert (writer.snapshot_bytes, writer._arena.segments) == (held, segments)
    assert len(os.listdir("/proc/self/fd")) <= fds
    assert len(os.listdir(f"/proc/{writer.pid}/fd")) <= child_fds
    assert [i.step for i in mgr.checkpoints] == [200, 201]  # the writer applied retention
    mgr.close()
    assert writer.pid is None


def _mapped_snapshot_bytes(pid: int) -> int:
    """Bytes of savepoint's snapshot segments mapped by process `pid` (memfds show as /memfd:NAME)."""
    total = 0
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            if "savepoint-snapshot" in line:
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                total += hi - lo
    return total


def test_a_state_that_grows_or_shrinks_gets_one_segment_of_its_new_size_in_both_processes(tmp_path):
    small, small_opt = _mlp(256)
    big, big_opt = _mlp(768)
    mgr = savepoint.CheckpointManager(tmp_path / "run", async_save="process")
    writer = _writer(mgr)
    for step, (model, opt) in enumerate(
        [(small, small_opt), (big, big_opt), (big, big_opt), (small, small_opt)]
    ):
        path = mgr.save(step, model=model, optimizer=opt)
        mgr.wait()
        assert find_problems(path) == []
        state = _state_bytes(model, opt)
        assert writer._arena.segments == 1
        assert state <= writer.snapshot_bytes <= state + 64 * 4096
        # The writer process unmapped the segments the trainer replaced: the memory is freed.
        assert _mapped_snapshot_bytes(writer.pid) == writer.snapshot_bytes
        assert _mapped_snapshot_bytes(os.getpid()) == writer.snapshot_bytes
    mgr.close()


def test_bytes_the_estimate_missed_fit_one_segment_from_the_next_save_on():
    dropped = []
    arena = SharedArena(lambda fd, size: None, on_drop=lambda: dropped.append(True))
    chunks = [os.urandom(n) for n in (300_000, 5_000_000, 2_000_000)]
    for save in range(3):
        arena.begin(1 << 20)  # far too little: a tokenizer's files, say, were not counted
        regions = [arena.put(memoryview(c), file_offset=17 * i) for i, c in enumerate(chunks)]
        assert [arena.view(r).tobytes() for r in regions] == chunks
        if save == 0:
            assert arena.segments > 1  # spilled over
    assert arena.segments == 1 and len(dropped) == 1  # folded into one, once
    assert sum(map(len, chunks)) <= arena.nbytes <= sum(map(len, chunks)) + 4 * 4096
    arena.close()


def test_a_save_with_a_tokenizer_keeps_one_segment(tmp_path, tokenizer):
    model, opt = trained_llama()
    mgr = savepoint.CheckpointManager(tmp_path / "run", async_save="process")
    writer = _writer(mgr)
    sizes = []
    for step in range(3):
        path = mgr.save(step, model=model, optimizer=opt, tokenizer=tokenizer)
        mgr.wait()
        assert find_problems(path) == []
        assert "tokenizer.json" in read_manifest(path).files
        sizes.append((writer.snapshot_bytes, writer._arena.segments))
    assert sizes[1] == sizes[2] and sizes[1][1] == 1
    mgr.close()


def test_one_save_in_flight_and_each_is_committed_in_order(tmp_path):
    model = torch.nn.Linear(64, 64)
    mgr = savepoint.CheckpointManager(tmp_path / "run", async_save="process")
    writer = _writer(mgr)
    writer.pause_s = 0.2  # each file takes a while: the second save must wait for the first
    mgr.save(1, model=model)
    assert writer.busy
    start = time.monotonic()
    mgr.save(2, model=model)
    assert time.monotonic() - start >= 0.2
    assert [i.step for i in mgr.checkpoints] == [1]
    mgr.wait()
    assert not writer.busy
    assert [i.step for i in mgr.checkpoints] == [1, 2]
    mgr.close()


def _break_write(root: str) -> None:
    """Remove the writer's staging directory under it, while it pauses between files."""
    deadline = time.monotonic() + 30
    while not (staged := glob.glob(os.path.join(root, ".tmp-step-*"))):
        assert time.monotonic() < deadline, "the writer never started"
        time.sleep(0.01)
    for path in staged:
        shutil.rmtree(path)  # gone from under the writer, and a file in its place: writes there fail
        with open(path, "wb"):
            pass


def test_a_failure_in_the_writer_is_raised_by_wait_then_saves_work_again(tmp_path):
    root = str(tmp_path / "run")
    model = torch.nn.Linear(8, 8)
    mgr = savepoint.CheckpointManager(root, async_save="process")
    _writer(mgr).pause_s = 0.5
    mgr.save(1, model=model)
    _break_write(root)
    with pytest.raises(BackgroundSaveError, match="step 1 failed in the writer process") as info:
        mgr.wait()
    assert "Traceback" in info.value.remote_traceback
    mgr.wait()  # reported once
    assert mgr.checkpoints == []
    _writer(mgr).pause_s = 0.0
    mgr.save(2, model=model)
    mgr.wait()
    assert [i.step for i in mgr.checkpoints] == [2]
    mgr.close()


def test_a_failure_in_the_writer_is_raised_by_the_next_save(tmp_path):
    root = str(tmp_path / "run")
    model = torch.nn.Linear(8, 8)
    mgr = savepoint.CheckpointManager(root, async_save="process")
    _writer(mgr).pause_s = 0.5
    mgr.save(1, model=model)
    _break_write(root)
    with pytest.raises(BackgroundSaveError, match="step 1"):
        mgr.save(2, model=model)
    assert [i.step for i in mgr.checkpoints] == []
    mgr.close()


def test_a_killed_writer_is_an_error_and_the_next_save_starts_a_new_one(tmp_path):
    model = torch.nn.Linear(8, 8)
    mgr = savepoint.CheckpointManager(tmp_path / "run", async_save="process")
    writer = _writer(mgr)
    writer.pause_s = 5.0
    mgr.save(1, model=model)
    first = writer.pid
    os.kill(first, signal.SIGKILL)
    with pytest.raises(BackgroundSaveError, match=f"pid {first}.*not committed"):
        mgr.wait()
    writer.pause_s = 0.0
    mgr.save(2, model=model)
    mgr.wait()
    assert writer.pid not in (None, first)
    assert [i.step for i in mgr.checkpoints] == [2]
    mgr.close()


def test_process_mode_refuses_remote_roots_and_unknown_modes(tmp_path):
    with pytest.raises(ValueError, match="local roots only"):
        savepoint.CheckpointManager("s3://bucket/run", async_save="process")
    with pytest.raises(ValueError, match='"process"'):
        savepoint.CheckpointManager(tmp_path / "run", async_save="fork")


def test_the_writer_runs_in_its_own_session_at_a_lower_priority(tmp_path):
    mgr = savepoint.CheckpointManager(tmp_path / "run", async_save="process")
    mgr.save(1, model=torch.nn.Linear(4, 4))
    mgr.wait()  # the writer has served a save, so it is past its start-up
    pid = _writer(mgr).pid
    assert os.getsid(pid) != os.getsid(0)  # a Ctrl-C or a group signal for the trainer does not reach it
    with open(f"/proc/{pid}/stat") as f:
        nice = int(f.read().rsplit(")", 1)[1].split()[16])
    assert nice >= min(19, os.nice(0) + 10)
    mgr.close()


@pytest.mark.parametrize("mode", [True, "process"])  # the thread writer records the same plan
def test_a_peft_adapter_is_saved_by_an_async_writer_as_a_sync_save_saves_it(tmp_path, mode):
    from peft import LoraConfig, get_peft_model

    from savepoint.demo import tiny

    torch.manual_seed(0)
    model = get_peft_model(tiny.tiny_llama(vocab_size=64), LoraConfig(target_modules=["q_proj"], r=4))
    with savepoint.CheckpointManager(tmp_path / "sync") as sync:
        expected = read_manifest(sync.save(1, model=model))
    with savepoint.CheckpointManager(tmp_path / "async", async_save=mode) as mgr:
        path = mgr.save(1, model=model)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(1.0)  # the adapter trains on: the snapshot must not see it
        mgr.wait()
        got = read_manifest(path)
    assert got.kind == expected.kind == "adapter" and got.base_model == expected.base_model
    same = {f: e for f, e in got.files.items() if "/rng/" not in f}
    assert same == {f: e for f, e in expected.files.items() if "/rng/" not in f}


def test_the_snapshot_copies_each_large_tensor_in_one_piece_and_exactly(tmp_path, monkeypatch):
    """One copy per tensor (torch's parallel copy, as a plain memcpy of the state), not per 8 MiB chunk;
    read-only bytes (a file another library wrote) go through the plain copy."""
    puts: list[int] = []
    original = SharedArena.put

    def counted(self, data, *, file_offset=0):  # type: ignore[no-untyped-def]
        puts.append(memoryview(data).nbytes)
        return original(self, data, file_offset=file_offset)

    monkeypatch.setattr(SharedArena, "put", counted)
    torch.manual_seed(0)
    model = torch.nn.Linear(2048, 2048)  # a 16 MiB weight
    sync = savepoint.CheckpointManager(tmp_path / "sync")
    expected = read_manifest(sync.save(1, model=model))
    with savepoint.CheckpointManager(tmp_path / "proc", async_save="process") as mgr:
        path = mgr.save(1, model=model)
        with torch.no_grad():
            model.weight.add_(1.0)
        mgr.wait()
    assert puts.count(2048 * 2048 * 4) == 1 and max(puts) == 2048 * 2048 * 4
    got = read_manifest(path).files
    assert {f: e for f, e in got.items() if "/rng/" not in f} == {
        f: e for f, e in expected.files.items() if "/rng/" not in f
    }
    arena = SharedArena(lambda fd, size: None)
    arena.begin(4 << 20)
    blob = os.urandom(3 << 20)  # bytes: read-only
    assert arena.view(arena.put(memoryview(blob), file_offset=5)).tobytes() == blob
    arena.close()
