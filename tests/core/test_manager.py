"""CheckpointManager end to end on tiny real models: save, list, restore, retention, damage, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import savepoint
from savepoint.demo import tiny
from savepoint.manifest import MANIFEST_NAME


def train_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, n: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


class Counter:
    """A minimal stateful object, as a data position would be."""

    def __init__(self) -> None:
        self.seen = 0

    def state_dict(self) -> dict:
        return {"seen": self.seen, "history": (1, 2.5, "x")}

    def load_state_dict(self, state: dict) -> None:
        self.seen = state["seen"]


def make_run(seed: int = 0):  # type: ignore[no-untyped-def]
    model = tiny.tiny_llama(seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s))
    return model, opt, sched


def test_roundtrip_restores_everything_and_loads_in_transformers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, opt, sched = make_run()
    train_steps(model, opt, 3)
    sched.step()
    counter = Counter()
    counter.seen = 42
    mgr = savepoint.CheckpointManager(tmp_path / "run")
    path = mgr.save(
        3,
        model=model,
        optimizer=opt,
        scheduler=sched,
        stateful={"data": counter},
        metrics={"eval_loss": torch.tensor(1.5)},
        extra={"tag": "a", "ema": torch.ones(2)},
    )
    # the checkpoint is itself a transformers model directory
    loaded = AutoModelForCausalLM.from_pretrained(path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)

    model2, opt2, sched2 = make_run(seed=9)
    counter2 = Counter()
    result = savepoint.CheckpointManager(tmp_path / "run").restore(
        model=model2, optimizer=opt2, scheduler=sched2, stateful={"data": counter2}
    )
    assert (result.step, result.metrics, result.path) == (3, {"eval_loss": 1.5}, path)
    assert result.extra["tag"] == "a" and torch.equal(result.extra["ema"], torch.ones(2))
    assert counter2.seen == 42
    assert sched2.state_dict() == sched.state_dict()
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["exp_avg"], opt2.state[b]["exp_avg"])
        assert torch.equal(opt.state[a]["exp_avg_sq"], opt2.state[b]["exp_avg_sq"])
    # and training continues identically
    train_steps(model, opt, 2, seed=5)
    train_steps(model2, opt2, 2, seed=5)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_nothing_to_restore_returns_step_zero_and_touches_nothing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, opt, _ = make_run()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = savepoint.CheckpointManager(tmp_path / "absent").restore(model=model, optimizer=opt)
    assert result.step == 0 and result.path is None
    assert not (tmp_path / "absent").exists()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_optimizer_state_survives_wrapping(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, opt, _ = make_run()
    train_steps(model, opt, 1)
    savepoint.CheckpointManager(tmp_path).save(1, model=torch.nn.DataParallel(model), optimizer=opt)
    model2, opt2, _ = make_run(seed=3)
    savepoint.CheckpointManager(tmp_path).restore(model=model2, optimizer=opt2)
    names = json.loads((tmp_path / "step-00000001/train_state/optimizer.json").read_text())["state"][
        "param_groups"
    ]
    assert "model.embed_tokens.weight" in names[0]["params"]
    assert torch.equal(
        opt2.state[model2.lm_head.weight]["exp_avg"], opt.state[model.lm_head.weight]["exp_avg"]
    )


def test_retention_keeps_best_and_last_and_survives_restart(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, _, _ = make_run()
    losses = {2: 3.0, 4: 0.5, 6: 2.0, 8: 1.5, 10: 1.0}
    kwargs = dict(save_every=2, keep_last=2, best_metric="eval_loss", keep_best=1)
    mgr = savepoint.CheckpointManager(tmp_path, **kwargs)
    for step in range(1, 7):
        mgr.maybe_save(step, model=model, metrics={"eval_loss": losses.get(step, 9)})
    assert [i.step for i in mgr.checkpoints] == [4, 6]
    mgr.close()
    mgr = savepoint.CheckpointManager(tmp_path, **kwargs)  # a restarted run derives best from manifests
    assert (mgr.best_step, mgr.latest_step) == (4, 6)
    for step in range(7, 11):
        mgr.maybe_save(step, model=model, metrics={"eval_loss": losses.get(step, 9)})
    assert [i.step for i in mgr.checkpoints] == [4, 8, 10]
    assert mgr.restore(model=model, step="best").step == 4


def test_damaged_latest_falls_back_and_explicit_step_names_the_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, opt, _ = make_run()
    mgr = savepoint.CheckpointManager(tmp_path)
    mgr.save(1, model=model, optimizer=opt)
    train_steps(model, opt, 1)
    mgr.save(2, model=model, optimizer=opt)
    weights = tmp_path / "step-00000002" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))

    with pytest.raises(savepoint.CorruptCheckpointError, match=r"model.safetensors: checksum mismatch"):
        savepoint.verify(tmp_path)
    model2, opt2, _ = make_run(seed=4)
    with pytest.warns(UserWarning, match=r"(?s)step-00000002.*model.safetensors"):
        assert mgr.restore(model=model2, optimizer=opt2).step == 1
    with pytest.raises(savepoint.CorruptCheckpointError, match=r"model.safetensors"):
        mgr.restore(model=model2, step=2)


@pytest.mark.parametrize("damage", ["truncate", "delete", "plant"])
def test_verify_names_each_damaged_file(tmp_path, damage: str) -> None:  # type: ignore[no-untyped-def]
    model, opt, _ = make_run()
    train_steps(model, opt, 1)
    path = savepoint.CheckpointManager(tmp_path).save(1, model=model, optimizer=opt)
    target = os.path.join(path, "train_state", "optimizer.safetensors")
    if damage == "truncate":
        os.truncate(target, 100)
    elif damage == "delete":
        os.remove(target)
    else:
        target = os.path.join(path, "extra.pkl")
        Path(target).write_bytes(b"\x80\x04N.")
    with pytest.raises(savepoint.CorruptCheckpointError) as info:
        savepoint.verify(path)
    assert [p.path for p in info.value.problems] == [os.path.relpath(target, path)]


def test_mismatched_model_lists_every_difference_and_changes_nothing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, opt, _ = make_run()
    savepoint.CheckpointManager(tmp_path).save(1, model=model, optimizer=opt)
    other = tiny.tiny_llama(seed=1, intermediate_size=48, num_hidden_layers=3)
    other_opt = torch.optim.AdamW(other.parameters())
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(savepoint.IncompatibleCheckpointError) as info:
        savepoint.CheckpointManager(tmp_path).restore(model=other, optimizer=other_opt)
    text = str(info.value)
    assert "missing in checkpoint: model.layers.2.mlp.down_proj.weight" in text
    assert "shape of model.layers.0.mlp.down_proj.weight" in text
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    assert other_opt.state_dict()["state"] == {}


def test_restore_asks_for_state_that_was_not_saved(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, opt, _ = make_run()
    savepoint.CheckpointManager(tmp_path).save(1, model=model)
    with pytest.raises(savepoint.IncompatibleCheckpointError, match="optimizer"):
        savepoint.CheckpointManager(tmp_path).restore(model=model, optimizer=opt)


def test_unsupported_state_fails_the_save_and_leaves_nothing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, _, _ = make_run()
    mgr = savepoint.CheckpointManager(tmp_path)
    mgr.save(1, model=model)
    with pytest.raises(savepoint.UnsupportedStateError, match=r"extra.fn"):
        mgr.save(2, model=model, extra={"fn": print})
    assert sorted(os.listdir(tmp_path)) == [".savepoint.lock", "step-00000001"]


def test_newer_format_version_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, _, _ = make_run()
    path = savepoint.CheckpointManager(tmp_path).save(1, model=model)
    manifest = json.loads(Path(os.path.join(path, MANIFEST_NAME)).read_text())
    manifest["format_version"] = 99
    Path(path, MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(savepoint.IncompatibleCheckpointError, match=r"version 99.*upgrade savepoint"):
        savepoint.CheckpointManager(tmp_path).restore(model=model, step=1)
    with warnings.catch_warnings(record=True):
        assert savepoint.CheckpointManager(tmp_path).checkpoints == []


def test_root_that_is_a_file_and_missing_paths(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "f").write_text("x")
    with pytest.raises(savepoint.CheckpointNotFoundError, match="is a file"):
        savepoint.CheckpointManager(tmp_path / "f")
    with pytest.raises(savepoint.CheckpointNotFoundError, match="does not exist"):
        savepoint.verify(tmp_path / "nope")
    model, _, _ = make_run()
    savepoint.CheckpointManager(tmp_path / "r").save(5, model=model)
    with pytest.raises(savepoint.CheckpointNotFoundError, match="available: 5"):
        savepoint.CheckpointManager(tmp_path / "r").restore(model=model, step=7)


def test_leftovers_of_interrupted_saves_are_swept_and_never_listed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, _, _ = make_run()
    mgr = savepoint.CheckpointManager(tmp_path)
    mgr.save(1, model=model)
    shutil.copytree(tmp_path / "step-00000001", tmp_path / ".tmp-step-00000002-dead")
    os.mkdir(tmp_path / "step-00000003")  # a directory without a manifest is not a checkpoint
    assert [i.step for i in mgr.checkpoints] == [1]
    mgr.close()
    savepoint.CheckpointManager(tmp_path).save(4, model=model)
    assert not (tmp_path / ".tmp-step-00000002-dead").exists()


def test_second_writer_is_refused_naming_the_holder(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, _, _ = make_run()
    mgr = savepoint.CheckpointManager(tmp_path)
    mgr.save(1, model=model)
    with pytest.raises(savepoint.LockedRootError, match=f"process {os.getpid()}"):
        savepoint.CheckpointManager(tmp_path).save(2, model=model)
    mgr.close()
    savepoint.CheckpointManager(tmp_path).save(2, model=model)


def test_saving_the_same_step_again_replaces_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, opt, _ = make_run()
    mgr = savepoint.CheckpointManager(tmp_path, save_every=2)
    mgr.maybe_save(2, model=model, metrics={"eval_loss": 1.0})
    mgr.save(2, model=model, optimizer=opt, metrics={"eval_loss": 0.5})
    assert [(i.step, dict(i.metrics)) for i in mgr.checkpoints] == [(2, {"eval_loss": 0.5})]
    savepoint.verify(tmp_path)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_full_disk_gives_a_clear_error_and_keeps_older_checkpoints(tmp_path) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "small"
    root.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(root)], check=False
    ).returncode:
        pytest.skip("cannot mount tmpfs here")
    try:
        small = torch.nn.Linear(16, 16)
        mgr = savepoint.CheckpointManager(root)
        mgr.save(1, model=small)
        with pytest.raises(savepoint.StorageError, match="disk is full"):
            mgr.save(2, model=tiny.tiny_llama(seed=0, hidden_size=128, intermediate_size=256))
        assert sorted(os.listdir(root)) == [".savepoint.lock", "step-00000001"]
        savepoint.verify(root)
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


def test_saving_consumes_no_randomness(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import random

    import numpy as np
    from torchdata.stateful_dataloader import StatefulDataLoader

    model, opt, sched = make_run()
    train_steps(model, opt, 1)
    loader = StatefulDataLoader(
        list(range(10)), batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    next(iter(loader))
    before = (
        random.getstate(),
        np.random.get_state()[1].copy(),
        torch.get_rng_state(),
        loader.generator.get_state(),
    )
    savepoint.CheckpointManager(tmp_path).save(
        1, model=model, optimizer=opt, scheduler=sched, stateful={"data": loader}, metrics={"loss": 1.0}
    )
    after = (random.getstate(), np.random.get_state()[1], torch.get_rng_state(), loader.generator.get_state())
    assert before[0] == after[0]
    assert np.array_equal(before[1], after[1])
    assert torch.equal(before[2], after[2]) and torch.equal(before[3], after[3])
