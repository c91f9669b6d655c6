"""Tier 0: a process restarted after a crash restores the newest checkpoint from shared memory.

The proof that a restore read the tier, not the disk: the disk's weight file is moved away first, so
only the tier can supply it. The disk manifest stays the judge of which copy may be used.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import fsspec
import pytest
import torch

import savepoint
from savepoint.demo import tiny
from savepoint.errors import CorruptCheckpointError
from savepoint.storage import memory_tier

SRC = str(Path(__file__).resolve().parents[2] / "src")
WEIGHTS = "model.safetensors"

CRASHING_TRAINER = textwrap.dedent(
    """
    import os, signal, sys, torch, savepoint
    from savepoint.demo import tiny
    model = tiny.tiny_llama(seed=0, hidden_size=64, intermediate_size=128)
    opt = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()  # AdamW moments to save
    mgr = savepoint.CheckpointManager(sys.argv[1], memory_tier=True, async_save=sys.argv[2])
    for step in (1, 2):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(step)
        mgr.save(step, model=model, optimizer=opt)
    mgr.wait()
    os.kill(os.getpid(), signal.SIGKILL)  # a crash: no close(), the tier stays for the restart
    """
)


@pytest.fixture(autouse=True)
def private_shm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    base = tmp_path / "shm"
    base.mkdir()
    monkeypatch.setenv("SAVEPOINT_MEMORY_TIER_DIR", str(base))
    return base


def _model() -> torch.nn.Module:
    return tiny.tiny_llama(seed=1, hidden_size=64, intermediate_size=128)


def _filled(value: float) -> torch.nn.Module:
    model = _model()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    return model


def _all_equal(model: torch.nn.Module, value: float) -> bool:
    return all(bool((p == value).all()) for p in model.parameters())


def _save(root: Path | str, step: int, **manager_args: object) -> savepoint.CheckpointManager:
    mgr = savepoint.CheckpointManager(root, memory_tier=True, **manager_args)  # type: ignore[arg-type]
    mgr.save(step, model=_filled(step))
    mgr.wait()
    return mgr


# The writer process in `make test`; `make torture` (SAVEPOINT_TORTURE=full) adds sync and thread saves.
FULL = os.environ.get("SAVEPOINT_TORTURE", "").lower() == "full"


@pytest.mark.parametrize("async_save", ["false", "thread", "process"] if FULL else ["process"])
def test_restart_after_sigkill_restores_from_memory(tmp_path: Path, async_save: str) -> None:
    root = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=SRC, PYTHONWARNINGS="ignore")
    mode = {"false": "", "thread": "thread", "process": "process"}[async_save]
    script = CRASHING_TRAINER.replace("async_save=sys.argv[2]", f"async_save={mode or False!r}")
    proc = subprocess.run([sys.executable, "-c", script, str(root)], env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL

    disk = root / "step-00000002"
    held = Path(memory_tier.tier_dir(str(root))) / "step-00000002"
    assert (held / "savepoint.json").read_bytes() == (disk / "savepoint.json").read_bytes()
    assert sorted(p.name for p in Path(memory_tier.tier_dir(str(root))).iterdir()) == ["step-00000002"]

    os.rename(disk / WEIGHTS, tmp_path / "moved")  # only the tier can supply the weights now
    model = _model()
    opt = torch.optim.AdamW(model.parameters())
    with savepoint.CheckpointManager(root, memory_tier=True) as mgr:
        result = mgr.restore(model=model, optimizer=opt)
    assert result.step == 2 and result.path == str(disk)
    assert _all_equal(model, 2.0)
    moments = [state["exp_avg"] for state in opt.state_dict()["state"].values()]
    assert moments and all(torch.allclose(m, torch.full_like(m, 0.1)) for m in moments)


def test_a_tier_holding_another_commit_is_not_used(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _save(root, 1)  # no close: the tier keeps step 1
    held = Path(memory_tier.tier_dir(str(root))) / "step-00000001"
    manifest = held / "savepoint.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"created": ', b'"created": 1'))  # not this commit
    os.rename(root / "step-00000001" / WEIGHTS, tmp_path / "moved")
    with pytest.raises(CorruptCheckpointError, match=WEIGHTS):
        savepoint.CheckpointManager(root, memory_tier=True).restore(model=_model(), step=1)


def test_a_damaged_tier_copy_falls_back_to_the_disk(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _save(root, 1)
    weights = Path(memory_tier.tier_dir(str(root))) / "step-00000001" / WEIGHTS
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    model = _model()
    with pytest.warns(UserWarning, match="memory tier's copy is damaged"):
        result = savepoint.CheckpointManager(root, memory_tier=True).restore(model=model)
    assert result.step == 1 and _all_equal(model, 1.0)


def test_close_frees_the_tier_and_a_crash_in_a_with_block_keeps_it(tmp_path: Path) -> None:
    root = tmp_path / "run"
    tier = Path(memory_tier.tier_dir(str(root)))
    _save(root, 1).close()
    assert not tier.exists()
    with pytest.raises(RuntimeError), savepoint.CheckpointManager(root, memory_tier=True) as mgr:
        mgr.save(2, model=_filled(2))
        raise RuntimeError("training blew up")
    assert (tier / "step-00000002" / "savepoint.json").is_file()


def test_a_planted_tier_directory_is_never_used_or_written_through(tmp_path: Path, private_shm: Path) -> None:
    root = tmp_path / "run"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    user_dir = private_shm / f"savepoint-{os.getuid()}"
    user_dir.mkdir(mode=0o700)
    os.symlink(elsewhere, memory_tier.tier_dir(str(root)))  # planted before our first save
    with pytest.warns(UserWarning, match="not a private directory"):
        _save(root, 1).close()  # close() drops no tier it does not own either
    assert list(elsewhere.iterdir()) == []

    os.unlink(memory_tier.tier_dir(str(root)))
    os.chmod(user_dir, 0o755)  # others could enter and swap files: not private
    with pytest.warns(UserWarning, match="not a private directory"):
        mgr = _save(root, 2)
    assert memory_tier.held_copy(str(root), str(root / "step-00000002")) is None
    mgr.close()


def test_the_default_tier_is_in_dev_shm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm on this machine")
    monkeypatch.delenv("SAVEPOINT_MEMORY_TIER_DIR")
    root = tmp_path / "run"
    mgr = _save(root, 1)
    try:
        assert memory_tier.tier_dir(str(root)).startswith("/dev/shm/savepoint-")
        assert memory_tier.held_copy(str(root), str(root / "step-00000001")) is not None
    finally:
        mgr.close()
    assert not os.path.exists(memory_tier.tier_dir(str(root)))


def test_an_object_store_root_restores_from_the_tier_without_downloading() -> None:
    root = f"memory:///savepoint-tier-{uuid.uuid4().hex}"
    try:
        _save(root, 1)  # no close(), as after a crash: the tier stays
        control = savepoint.CheckpointManager(root)
        control.restore(model=_model())
        assert control._remote is not None and control._remote.transfers["downloaded"] > 0

        restorer = savepoint.CheckpointManager(root, memory_tier=True)
        model = _model()
        assert restorer.restore(model=model).step == 1 and _all_equal(model, 1.0)
        assert restorer._remote is not None and restorer._remote.transfers["downloaded"] == 0
        restorer.close()
    finally:
        fsspec.filesystem("memory").rm(root[len("memory://") :], recursive=True)


def test_an_async_writer_fills_the_tier_from_its_snapshot_not_from_the_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    read_back: list[int] = []
    real_copy = memory_tier.copy_range

    def counted(src_fd: int, dst_fd: int, size: int) -> None:
        read_back.append(size)
        real_copy(src_fd, dst_fd, size)

    monkeypatch.setattr(memory_tier, "copy_range", counted)
    root = tmp_path / "run"
    mgr = _save(root, 1, async_save=True)  # the thread writer runs the process writer's write_plan
    manifest = savepoint.CheckpointManager(root).checkpoints[-1].path + "/savepoint.json"
    assert read_back == [os.path.getsize(manifest)]  # only the manifest is read from the disk
    os.rename(root / "step-00000001" / WEIGHTS, tmp_path / "moved")  # only the tier can supply it now
    model = _model()
    assert mgr.restore(model=model).step == 1 and _all_equal(model, 1.0)
    mgr.close()


def test_held_bytes_that_do_not_match_the_manifest_size_are_read_from_the_disk(tmp_path: Path) -> None:
    root = tmp_path / "run"
    savepoint.CheckpointManager(root).save(1, model=_filled(1))
    path = str(root / "step-00000001")
    held = memory_tier.publish(str(root), path, contents={WEIGHTS: [b"too short"]})
    assert held is not None
    assert (Path(held) / WEIGHTS).read_bytes() == (Path(path) / WEIGHTS).read_bytes()
