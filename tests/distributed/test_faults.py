"""A rank that dies, raises or stalls during a save: nothing is committed, the previous checkpoint is
intact, and the surviving rank raises a clear error within the timeout instead of hanging."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tests.distributed.common import REPO, worker_env

import savepoint

pytestmark = pytest.mark.slow
WORKER = str(REPO / "tests" / "distributed" / "worker_faults.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(root: Path, mode: str, timeout: float) -> list[subprocess.Popen[str]]:
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = worker_env(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, WORKER, str(root), mode, str(timeout)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def result_line(stderr: str) -> str:
    return next(
        (line for line in stderr.splitlines() if line.startswith("RESULT")),
        f"no RESULT line:\n{stderr[-3000:]}",
    )


def assert_nothing_committed(root: Path) -> None:
    assert [i.step for i in savepoint.CheckpointManager(root).checkpoints][:1] == [1]
    assert not (root / "step-00000002").exists()
    savepoint.verify(root)  # step 1 is intact, file by file
    assert not [p.name for p in root.iterdir() if p.name.startswith(".tmp-")], (
        "the survivor left its temp dir"
    )


def test_killed_rank(tmp_path: Path) -> None:
    rank0, rank1 = launch(tmp_path, "kill", timeout=60)
    rank1.communicate(timeout=240)
    _, err0 = rank0.communicate(timeout=120)  # well within the timeout: gloo sees the closed connection
    assert rank1.returncode == -9
    assert rank0.returncode == 3, err0[-3000:]
    assert "DistributedSaveError" in result_line(err0) and "nothing was committed" in result_line(err0)
    assert_nothing_committed(tmp_path)


def test_raising_rank(tmp_path: Path) -> None:
    procs = launch(tmp_path, "raise", timeout=60)
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [3, 3], errs[0][-3000:] + errs[1][-3000:]
    assert "DistributedSaveError" in result_line(
        errs[0]
    ) and "rank 1: RuntimeError: injected fault" in result_line(errs[0])
    assert result_line(errs[1]).split()[1] == "RuntimeError"  # the failing rank raises its own error
    # the failed save left nothing, and the ranks, all alive, saved the next step together
    assert [i.step for i in savepoint.CheckpointManager(tmp_path).checkpoints] == [1, 3]
    assert not (tmp_path / "step-00000002").exists()
    savepoint.verify(tmp_path)


def test_stalled_rank_times_out(tmp_path: Path) -> None:
    rank0, rank1 = launch(tmp_path, "hang", timeout=8)
    try:
        _, err0 = rank0.communicate(timeout=240)
    finally:
        rank1.kill()
        rank1.communicate()
    assert rank0.returncode == 3, err0[-3000:]
    outcome, seconds = result_line(err0).split()[1:3]
    assert outcome == "DistributedSaveError"
    assert float(seconds) < 8 + 30, f"rank 0 waited {seconds}s with a timeout of 8s"
    assert_nothing_committed(tmp_path)


def test_rank_killed_while_restoring_sharded_state(tmp_path: Path) -> None:
    rank0, rank1 = launch(tmp_path, "kill-restore", timeout=60)
    rank1.communicate(timeout=240)
    _, err0 = rank0.communicate(timeout=120)  # gloo sees the closed connection: well within the timeout
    assert rank1.returncode == -9
    assert rank0.returncode == 3, err0[-3000:]
    outcome, _seconds, fell_back = result_line(err0).split()[1:4]
    # A dead peer is not damage: the survivor must not blame the checkpoint and fall back to step 1.
    assert outcome == "DistributedSaveError" and fell_back == "fell_back=False", result_line(err0)
    assert [i.step for i in savepoint.CheckpointManager(tmp_path).checkpoints] == [1, 2]
    savepoint.verify(tmp_path)
