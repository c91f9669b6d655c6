"""What the ranks of a collective save or restore must agree on, with real processes (gloo, CPU):
a root every rank sees, the step to restore, and a rank that dies inside the weight gather. The model
is an FSDP2-sharded plain `nn.Sequential` (no transformers model), saved and restored exactly."""

from __future__ import annotations

import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tests.distributed.common import REPO, worker_env

import savepoint

pytestmark = pytest.mark.slow
WORKER = str(REPO / "tests" / "distributed" / "worker_coordination.py")
TIMEOUT = 20  # dist_timeout: every outcome below must come well within it


def run_pair(
    mode: str, base: Path, *, kill: bool = False, own_disks: bool = False
) -> dict[int, dict[str, list[str]]]:
    """Both ranks' `RESULT key outcome seconds message` lines, as {rank: {key: [outcome, seconds, message]}}."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = []
    for rank in (0, 1):
        env = worker_env(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port
        )
        cmd = [sys.executable, WORKER, mode, str(base), str(TIMEOUT)]
        if own_disks:  # BASE/root is this rank's BASE/disk-<rank>, in a mount namespace of its own
            disk = base / f"disk-{rank}"
            disk.mkdir()
            mount = f"mount --bind {shlex.quote(str(disk))} {shlex.quote(str(base / 'root'))}"
            cmd = ["unshare", "-m", "sh", "-c", f"{mount} && exec {shlex.join(cmd)}"]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    errs = [p.communicate(timeout=180)[1] for p in procs]
    expected = [0, -9] if kill else [0, 0]
    assert [p.returncode for p in procs] == expected, errs[0][-3000:] + errs[1][-3000:]
    results: dict[int, dict[str, list[str]]] = {}
    for rank, err in enumerate(errs):
        for line in err.splitlines():
            if line.startswith("RESULT "):
                key, *rest = line.split(" ", 4)[1:]
                results.setdefault(rank, {})[key] = rest + [""] * (3 - len(rest))
    return results


def assert_no_temp_dirs(*roots: Path) -> None:
    for root in roots:
        if root.exists():
            left = [p.name for p in root.iterdir() if p.name.startswith((".tmp-", ".old-"))]
            assert not left, f"{root} holds {left}"


def can_bind_mount(base: Path) -> bool:
    (base / "probe").mkdir()
    cmd = ["unshare", "-m", "mount", "--bind", str(base), str(base / "probe")]
    try:
        return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0
    except OSError:
        return False


def test_root_not_shared_fails_on_every_rank(tmp_path: Path) -> None:
    """Two ranks whose roots are different directories (another root string per rank)."""
    results = run_pair("unshared", tmp_path)
    for rank in (0, 1):
        outcome, seconds, message = results[rank]["save"]
        assert outcome == "DistributedSaveError", (rank, outcome, message)
        assert "shared filesystem" in message and "object-store root" in message, message
        assert float(seconds) < TIMEOUT
    # nothing committed on either "disk"; the earlier checkpoint is intact; no temp dir left anywhere
    for root in (tmp_path / "rank-0", tmp_path / "rank-1"):
        assert not root.exists() or savepoint.CheckpointManager(root).checkpoints == []
        assert not (root / "step-00000002").exists()
    assert [i.step for i in savepoint.CheckpointManager(tmp_path / "shared").checkpoints] == [1]
    savepoint.verify(tmp_path / "shared")
    assert_no_temp_dirs(tmp_path / "shared", tmp_path / "rank-0", tmp_path / "rank-1")


def test_restore_agreement_and_plain_fsdp2_module(tmp_path: Path) -> None:
    results = run_pair("agreement", tmp_path)
    # rank 0 sees step 2, rank 1 does not: both fail, quickly, with a savepoint error naming the cause
    ahead = [results[r]["ahead"] for r in (0, 1)]
    assert ahead[1][0] == "CheckpointNotFoundError" and "different checkpoints" in ahead[1][2], ahead
    assert ahead[0][0] == "DistributedSaveError" and "nothing was changed on any rank" in ahead[0][2], ahead
    assert "rank 1: CheckpointNotFoundError" in ahead[0][2], ahead
    assert all(float(seconds) < TIMEOUT / 2 for _, seconds, _ in ahead), ahead
    # rank 0 sees only step 1 (rank 1 also sees step 2): both restore rank 0's choice, exactly
    for rank in (0, 1):
        assert results[rank]["behind"][:1] + results[rank]["behind"][2:] == ["ok", "1"], results[rank]
        assert results[rank]["behind-state"][0] == "exact", results[rank]
        # step 2 is damaged where rank 1 looks: every rank falls back to step 1 together
        assert results[rank]["damaged"][:1] + results[rank]["damaged"][2:] == ["ok", "1"], results[rank]
        assert results[rank]["damaged-state"][0] == "exact", results[rank]
        assert results[rank]["shared"][0] == "ok" and results[rank]["shared"][2] == "2", results[rank]
        assert results[rank]["shared-state"][0] == "exact", results[rank]
        assert results[rank]["export"][0] == "ok", results[rank]
    assert results[0]["export-state"][0] == "exact", results[0]
    assert results[0]["groups"][0] == results[1]["groups"][0] == "1", "restore built a second gloo group"
    savepoint.verify(tmp_path / "a")
    savepoint.verify(tmp_path / "export")


def test_same_root_path_on_separate_disks_fails_on_every_rank(tmp_path: Path) -> None:
    """The cloud set-up itself: one root path string, a different directory behind it on each rank
    (a bind mount in a private mount namespace per rank, as two nodes' local disks)."""
    if not can_bind_mount(tmp_path):
        pytest.skip("needs `unshare -m` and bind mounts (root)")
    (tmp_path / "root").mkdir()
    results = run_pair("same-path", tmp_path, own_disks=True)
    for rank in (0, 1):
        outcome, seconds, message = results[rank]["save"]
        assert outcome == "DistributedSaveError", (rank, outcome, message)
        assert "shared filesystem" in message and "object-store root" in message, message
        assert float(seconds) < TIMEOUT
    for disk in (tmp_path / "disk-0", tmp_path / "disk-1"):
        assert [p.name for p in disk.iterdir() if not p.name.startswith(".savepoint")] == [], disk
    assert not list((tmp_path / "root").iterdir())  # nothing went to the real directory behind the mounts
    assert [i.step for i in savepoint.CheckpointManager(tmp_path / "shared").checkpoints] == [1]
    savepoint.verify(tmp_path / "shared")


@pytest.mark.parametrize("mode", ["kill-gather", "kill-export"])
def test_rank_killed_during_weight_gather(tmp_path: Path, mode: str) -> None:
    results = run_pair(mode, tmp_path, kill=True)
    key = "save" if mode == "kill-gather" else "export"
    outcome, seconds, message = results[0][key]
    assert outcome == "DistributedSaveError", (outcome, message)
    assert "gathering the weights" in message and "nothing was committed" in message, message
    assert float(seconds) < TIMEOUT, seconds
    shared = tmp_path / "shared"
    assert [i.step for i in savepoint.CheckpointManager(shared).checkpoints] == [1]
    savepoint.verify(shared)
    assert not (tmp_path / "export").exists()
    assert_no_temp_dirs(shared, tmp_path)


def test_commit_lists_only_files_rank0_sees(tmp_path: Path) -> None:
    """The backstop behind the root check: a file another rank reported but rank 0 cannot see (or sees
    at another size) fails the commit instead of being listed in the manifest."""
    from savepoint.distributed import DistributedSaveError
    from savepoint.pipeline.commit import check_reported
    from savepoint.pipeline.staging import SharedStagedDir

    staged = SharedStagedDir(str(tmp_path), "step-00000002")
    staged.write_bytes("train_state/rng/rank-00001.json", b"{}")
    check_reported(staged, 1, {"train_state/rng/rank-00001.json": (2, "x")})  # seen: fine
    with pytest.raises(DistributedSaveError, match=r"rank 1 wrote.*absent.*shared filesystem"):
        check_reported(staged, 1, {"train_state/rng/rank-00001.safetensors": (8, "x")})
    with pytest.raises(DistributedSaveError, match=r"2 bytes, reported 5"):
        check_reported(staged, 1, {"train_state/rng/rank-00001.json": (5, "x")})
