"""`async_save=True` under torchrun (2 ranks, gloo): every rank snapshots and returns, the write, report
and commit run in the background; failures surface on every rank (see worker_async.py)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from tests.distributed.common import assert_same, plain_reference, torchrun

import savepoint
from savepoint.demo import tiny
from savepoint.manifest import read_manifest

pytestmark = pytest.mark.slow


def test_async_save_under_torchrun_commits_the_save_time_state_and_reports_failures_everywhere(tmp_path):
    torchrun("worker_async.py", str(tmp_path), timeout=300)
    run = tmp_path / "run"
    manifest = read_manifest(str(run / "step-00000001"))
    assert manifest.world_size == 2
    assert {"model.safetensors", "train_state/rng/rank-00001.json"} <= set(manifest.files)
    savepoint.verify(run)
    model = tiny.tiny_gpt2(seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with pytest.warns(UserWarning, match="restored at 1"):
        savepoint.CheckpointManager(run).restore(model=model, optimizer=opt, step=1)
    assert_same(load_file(tmp_path / "ref.safetensors"), plain_reference(model, opt), where="one process")
