"""The async writers run below the training loop: the writer process SCHED_IDLE, a writer thread (which
shares the trainer's GIL) and every writer under torchrun niced."""

from __future__ import annotations

import os

import pytest
import torch

import savepoint
from savepoint.io.priority import writer_policy
from savepoint.snapshot import BackgroundWriter


def _policy_of_a_writer_thread() -> tuple[int, int]:
    seen: list[tuple[int, int]] = []
    writer = BackgroundWriter()
    writer.submit(lambda: seen.append((os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0))))
    writer.wait()
    return seen[0]


def _process_policy(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[38]), int(fields[16])  # policy, nice (proc(5): fields 41 and 19, from 3)


@pytest.mark.parametrize("world_size", [None, "2"])
def test_a_writer_thread_is_niced_not_idle(monkeypatch, world_size):
    # It shares the GIL: starved while holding it, it would stall the training thread. Under torchrun
    # its peers wait on its collectives too.
    monkeypatch.delenv("SAVEPOINT_WRITER_PRIORITY", raising=False)
    if world_size is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world_size)
    policy, nice = _policy_of_a_writer_thread()
    assert policy == os.SCHED_OTHER
    assert nice >= min(19, os.nice(0) + 10)
    assert os.getpriority(os.PRIO_PROCESS, 0) == os.nice(0)  # the trainer's own thread is untouched


def test_under_torchrun_a_writer_process_would_be_niced_not_idle(monkeypatch):
    monkeypatch.delenv("SAVEPOINT_WRITER_PRIORITY", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert writer_policy(separate_process=True) == "nice"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert writer_policy(separate_process=True) == "idle"


@pytest.mark.parametrize(
    ("value", "policy"), [("idle", os.SCHED_IDLE), ("nice", os.SCHED_OTHER), ("normal", os.SCHED_OTHER)]
)
def test_the_environment_overrides_the_policy(monkeypatch, value, policy):
    monkeypatch.setenv("SAVEPOINT_WRITER_PRIORITY", value)
    seen_policy, nice = _policy_of_a_writer_thread()
    assert seen_policy == policy
    assert (nice > os.nice(0)) == (value != "normal")


def test_the_writer_process_runs_only_on_idle_cycles(tmp_path, monkeypatch):
    monkeypatch.delenv("SAVEPOINT_WRITER_PRIORITY", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with savepoint.CheckpointManager(tmp_path / "run", async_save="process") as mgr:
        mgr.save(1, model=torch.nn.Linear(4, 4))
        mgr.wait()  # past its start-up
        policy, nice = _process_policy(mgr._writer.pid)
    assert policy == os.SCHED_IDLE
    assert nice >= min(19, os.nice(0) + 10)


def test_an_unknown_policy_is_refused_when_the_manager_is_made(tmp_path, monkeypatch):
    monkeypatch.setenv("SAVEPOINT_WRITER_PRIORITY", "realtime")
    with pytest.raises(ValueError, match="SAVEPOINT_WRITER_PRIORITY must be one of idle, nice, normal"):
        savepoint.CheckpointManager(tmp_path / "run", async_save=True)
    savepoint.CheckpointManager(tmp_path / "sync")  # a synchronous manager has no writer to configure
    monkeypatch.setenv("SAVEPOINT_WRITER_PRIORITY", " IDLE ")
    assert writer_policy() == "idle"
