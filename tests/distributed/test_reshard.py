"""4 FSDP2 ranks save; 3, 2 and 1 rank(s) restore, exactly, with `sharded_model` False and True.

The oracle is torch's own full state of the 4-rank job (DCP's get_model_state_dict /
get_optimizer_state_dict with full_state_dict=True). At each new size the restored weights, AdamW
moments (gathered to full tensors) and scheduler must equal it bit for bit, and two more training steps
from the restore must equal two steps from the oracle loaded through DCP's own set_*_state_dict.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.distributed.common import REPO, torchrun, worker_env

import savepoint
from savepoint.manifest import read_manifest

pytestmark = pytest.mark.slow
# 3 ranks (uneven shards) and 1 (a plain process) run in `make test`; 2 in `make torture`, as
# tests/distributed/test_fsdp2.py already restores a 2-rank save at 2 and 1.
FULL = os.environ.get("SAVEPOINT_TORTURE", "").lower() == "full"


@pytest.fixture(scope="module")
def saved_at_4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reshard")
    torchrun("worker_reshard.py", "save", str(out), nproc=4, timeout=600)
    return out


def restore_at(world: int, out: Path) -> dict:
    if world == 1:  # a plain process: no process group, an unsharded model
        script = str(REPO / "tests" / "distributed" / "worker_reshard.py")
        done = subprocess.run(
            [sys.executable, script, "restore", str(out)],
            env=worker_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-6000:]
    else:
        torchrun("worker_reshard.py", "restore", str(out), nproc=world, timeout=600)
    return json.loads((out / f"result-{world}.json").read_text())


def test_both_checkpoints_hold_4_ranks_parts(saved_at_4: Path) -> None:
    for name, kind in (("gathered", "model"), ("sharded", "sharded")):
        manifest = read_manifest(str(saved_at_4 / name / "step-00000002"))
        assert manifest.world_size == 4 and manifest.kind == kind
        assert {f"train_state/dcp/__{r}_0.distcp" for r in range(4)} <= set(manifest.files)
        savepoint.verify(str(saved_at_4 / name))


@pytest.mark.parametrize(
    "world",
    [
        3,
        pytest.param(2, marks=pytest.mark.skipif(not FULL, reason="make torture (SAVEPOINT_TORTURE=full)")),
        1,
    ],
)
def test_restore_at_fewer_ranks_is_exact(saved_at_4: Path, world: int) -> None:
    result = restore_at(world, saved_at_4)
    assert set(result) == {"gathered", "sharded"}
    for name, outcome in result.items():
        assert outcome["step"] == 2, (name, outcome)
        assert outcome["tensors"] > 20, (name, outcome)  # weights and two moments per parameter
        assert outcome["restored"] == [], (
            f"{name} at {world} rank(s): differs from the oracle: {outcome['restored']}"
        )
        assert outcome["continued"] == [], (
            f"{name} at {world} rank(s): training on differs from training on from the oracle: {outcome['continued']}"
        )
