"""Roots on object stores: `CheckpointManager("s3://bucket/run")` and any fsspec URL.

The S3 tests talk to a real S3-protocol server (moto, on 127.0.0.1) through s3fs; `memory://` runs
the same code paths in-process for the fast cases.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
import torch
from tests.integrations.upload_child import model_and_optimizer

import savepoint
from savepoint.errors import CheckpointNotFoundError, CorruptCheckpointError
from savepoint.storage.remote import RemoteRoot

CHILD = Path(__file__).with_name("upload_child.py")
REPO = Path(__file__).resolve().parents[2]


def fresh_model() -> torch.nn.Module:
    return model_and_optimizer(seed=99)[0]


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def objects(root: str, step: int) -> list[str]:
    fs, path = fsspec.core.url_to_fs(root)
    fs.invalidate_cache()
    return fs.find(f"{path}/step-{step:08d}")


@pytest.mark.parametrize("root_fixture", ["memory_root", "s3_root"])
def test_save_list_restore_verify(root_fixture: str, request: pytest.FixtureRequest) -> None:
    root = request.getfixturevalue(root_fixture)
    model, optimizer = model_and_optimizer(seed=1)
    with savepoint.CheckpointManager(root, keep_last=1, best_metric="loss", keep_best=1) as mgr:
        for step, loss in [(1, 0.2), (2, 0.9), (3, 0.7)]:
            mgr.save(
                step, model=model, optimizer=optimizer, metrics={"loss": loss}, extra={"note": f"s{step}"}
            )
        # keep_last=1 keeps 3; the best (1) is never deleted; 2 is gone, objects and all.
        assert [i.step for i in mgr.checkpoints] == [1, 3]
        assert mgr.best_step == 1 and mgr.latest_step == 3
        assert objects(root, 2) == []

    reopened = savepoint.CheckpointManager(root, best_metric="loss")
    target = fresh_model()
    opt = torch.optim.AdamW(target.parameters(), lr=0.1)
    result = reopened.restore(model=target, optimizer=opt)
    assert (result.step, result.extra, result.path) == (3, {"note": "s3"}, f"{root}/step-00000003")
    assert same_weights(target, model)
    assert opt.state_dict()["state"][0]["exp_avg"].equal(optimizer.state_dict()["state"][0]["exp_avg"])
    assert reopened.restore(model=fresh_model(), step="best").step == 1
    assert savepoint.verify(root) == [f"{root}/step-00000001", f"{root}/step-00000003"]
    assert savepoint.verify(f"{root}/step-00000003") == [f"{root}/step-00000003"]
    with pytest.raises(CheckpointNotFoundError, match="available: 1, 3"):
        reopened.restore(model=fresh_model(), step=2)


@pytest.mark.parametrize("after", [0, 1, 3, "all files"])
def test_interrupted_upload_leaves_no_checkpoint(memory_root: str, after: int | str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    model, optimizer = model_and_optimizer(seed=1)
    mgr = savepoint.CheckpointManager(memory_root)
    mgr.save(1, model=model, optimizer=optimizer)
    files_of_step_1 = len(objects(memory_root, 1)) - 1  # all but the manifest
    limit = files_of_step_1 if after == "all files" else after
    put, done = RemoteRoot._put, []

    def failing_put(self: RemoteRoot, local: str, key: str) -> None:
        if len(done) == limit:
            raise ConnectionError("network gone")
        put(self, local, key)
        done.append(key)

    monkeypatch.setattr(RemoteRoot, "_put", failing_put)
    with pytest.raises(ConnectionError):
        mgr.save(2, model=model, optimizer=optimizer)
    assert len(done) == limit and not any(k.endswith("savepoint.json") for k in done)
    monkeypatch.undo()

    reader = savepoint.CheckpointManager(memory_root)
    assert [i.step for i in reader.checkpoints] == [1]
    assert len(objects(memory_root, 2)) == limit  # the partial upload is there, and not a checkpoint
    target = fresh_model()
    assert reader.restore(model=target).step == 1 and same_weights(target, model)
    with pytest.raises(CheckpointNotFoundError):
        reader.restore(model=fresh_model(), step=2)
    savepoint.verify(memory_root)
    # The next writer sweeps what the interrupted upload left.
    reader.save(3, model=model)
    assert objects(memory_root, 2) == []
    assert [i.step for i in reader.checkpoints] == [1, 3]


@pytest.mark.parametrize("after", [1, 4])
def test_upload_killed_by_sigkill_leaves_no_checkpoint(
    s3_root: str, s3_env: dict[str, str], after: int
) -> None:
    env = {**os.environ, **s3_env, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
    child = subprocess.run(
        [sys.executable, str(CHILD), s3_root, "--after", str(after)],
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-3000:]
    assert len(objects(s3_root, 2)) == after  # killed mid-upload: some objects, no manifest

    mgr = savepoint.CheckpointManager(s3_root)
    assert [i.step for i in mgr.checkpoints] == [1]
    target = fresh_model()
    assert mgr.restore(model=target).step == 1
    assert same_weights(target, model_and_optimizer(seed=1)[0])
    assert savepoint.verify(s3_root) == [f"{s3_root}/step-00000001"]
    mgr.save(2, model=model_and_optimizer(seed=2)[0])  # the writer sweeps the leftovers and re-saves
    assert [i.step for i in mgr.checkpoints] == [1, 2]
    savepoint.verify(s3_root)


def test_damaged_object_is_named_and_latest_falls_back(memory_root: str) -> None:
    model, _ = model_and_optimizer(seed=1)
    mgr = savepoint.CheckpointManager(memory_root)
    mgr.save(1, model=model)
    mgr.save(2, model=fresh_model())
    fs, path = fsspec.core.url_to_fs(memory_root)
    weights = f"{path}/step-00000002/model.safetensors"
    data = bytearray(fs.cat_file(weights))
    data[-1] ^= 0xFF
    fs.pipe_file(weights, bytes(data))
    fs.pipe_file(f"{path}/step-00000001/planted.bin", b"x")

    with pytest.raises(CorruptCheckpointError) as info:
        savepoint.verify(memory_root)
    message = str(info.value)
    assert "step-00000002/model.safetensors: checksum mismatch" in message
    assert "step-00000001/planted.bin: present but not listed" in message
    target = fresh_model()
    with pytest.warns(UserWarning, match="step-00000002"):
        assert mgr.restore(model=target).step == 1
    assert same_weights(target, model)
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors"):
        mgr.restore(model=fresh_model(), step=2)


def test_async_save_uploads_in_background(memory_root: str) -> None:
    model, optimizer = model_and_optimizer(seed=1)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with savepoint.CheckpointManager(memory_root, async_save=True) as mgr:
        mgr.save(5, model=model, optimizer=optimizer)
        with torch.no_grad():  # training goes on while the upload runs: the snapshot is what lands
            for p in model.parameters():
                p.add_(1.0)
        mgr.wait()
        assert [i.step for i in mgr.checkpoints] == [5]
        staging = mgr._write_root
        assert os.listdir(staging) == []  # committed locally, uploaded, and the local copy removed
    target = fresh_model()
    savepoint.CheckpointManager(memory_root).restore(model=target)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in expected.items())


def test_cli_ls_and_verify_accept_object_store_urls(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from savepoint.cli import main

    url = f"memory://cli-{tmp_path.name}/run"
    model = torch.nn.Linear(3, 2)
    with savepoint.CheckpointManager(url) as mgr:
        mgr.save(1, model=model, metrics={"eval_loss": 2.0})
        mgr.save(2, model=model, metrics={"eval_loss": 1.0})

    def run(*args: str) -> int:
        old = sys.argv
        sys.argv = ["savepoint", *args]
        try:
            main()
        except SystemExit as exc:
            return int(exc.code or 0)
        finally:
            sys.argv = old
        return 0

    assert run("ls", url, "--json") == 0
    assert '"step": 2' in capsys.readouterr().out
    assert run("verify", url) == 0
    assert "step-00000002: intact" in capsys.readouterr().out
    fs = fsspec.filesystem("memory")
    key = f"/cli-{tmp_path.name}/run/step-00000001/model.safetensors"
    data = bytearray(fs.cat(key))
    data[-1] ^= 0xFF
    fs.pipe(key, bytes(data))
    assert run("verify", url) == 1
    assert "model.safetensors: checksum mismatch" in capsys.readouterr().out
