"""async_save=True at world size 1 on a local root: the save is recorded into the thread writer's own
arena at save() time and the same `write_plan` as the writer process's writes it, so tensor bytes go to
the disk with O_DIRECT straight from the snapshot."""

from __future__ import annotations

import ctypes
import os
import types

import torch
from tests.async_save.helpers import mutate, trained_llama

import savepoint
from savepoint import snapshot
from savepoint.io import direct
from savepoint.manifest import find_problems, read_manifest


def _state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    tensors = list(model.state_dict().values())
    tensors += [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _without_rng(files: dict) -> dict:  # type: ignore[type-arg]
    return {f: e for f, e in files.items() if "/rng/" not in f}  # the RNG advanced between saves


def test_tensor_bytes_go_to_the_disk_from_the_snapshot_not_through_a_bounce_buffer(tmp_path, monkeypatch):
    bounced: list[int] = []

    def memmove(dst: int, src: int, n: int) -> int:
        bounced.append(n)
        return ctypes.memmove(dst, src, n)

    monkeypatch.setattr(direct, "ctypes", types.SimpleNamespace(memmove=memmove))
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 512))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 512)).sum().backward()
    opt.step()
    state = _state_bytes(model, opt)  # 3.1 MB
    root = str(tmp_path / "run")
    mgr = savepoint.CheckpointManager(root, async_save=True, keep_last=2)
    for step in range(1, 4):
        bounced.clear()
        path = mgr.save(step, model=model, optimizer=opt)
        mutate(model, opt)  # training goes on: the snapshot must not see it
        mgr.wait()
        assert find_problems(path) == []
        # Only headers and the blocks they share with the first tensor bytes are copied to write them.
        assert 0 < sum(bounced) < 64 << 10, sum(bounced)
    writer = mgr._writer
    assert writer._arena.segments == 1 and state <= writer.snapshot_bytes <= state + 64 * 4096
    assert snapshot.pool_for(root).nbytes == 0  # no second snapshot in pooled host tensors
    assert [i.step for i in mgr.checkpoints] == [2, 3]  # retention
    mgr.close()
    assert writer.snapshot_bytes == 0  # close frees the snapshot memory


def test_a_thread_save_writes_what_a_sync_save_writes_and_links_unchanged_files(tmp_path, tokenizer):
    model, opt = trained_llama()
    sync = savepoint.CheckpointManager(tmp_path / "sync")
    expected = read_manifest(
        sync.save(3, model=model, optimizer=opt, tokenizer=tokenizer, metrics={"loss": 1.5})
    )
    with savepoint.CheckpointManager(tmp_path / "thread", async_save=True) as mgr:
        first = mgr.save(3, model=model, optimizer=opt, tokenizer=tokenizer, metrics={"loss": 1.5})
        mgr.wait()
        got = read_manifest(first)
        assert _without_rng(got.files) == _without_rng(expected.files)
        assert got.step == 3 and got.metrics == {"loss": 1.5} and "tokenizer.json" in got.files
        second = mgr.save(4, model=model, optimizer=opt, tokenizer=tokenizer)
        mgr.wait()
        assert find_problems(second) == []
        assert read_manifest(second).parent == os.path.basename(first)
        # Dedupe against the parent: unchanged files are hard links, not written again.
        for name in ("tokenizer.json", "model.safetensors"):
            assert os.stat(os.path.join(second, name)).st_ino == os.stat(os.path.join(first, name)).st_ino


def test_a_model_in_the_hub_layout_is_converted_no_more_than_a_sync_save_converts_it(tmp_path, monkeypatch):
    """The recording converts the weights to the Hub layout group by group as a sync save does (sizing
    the snapshot converts nothing), and the files are the sync save's."""
    from tests.helpers.converted_models import BUILDERS

    from savepoint.formats.hub_layout import HubLayout

    converted: list[int] = []
    real = HubLayout.to_hub

    def counted(self, state, group):  # type: ignore[no-untyped-def]
        converted.append(group)
        return real(self, state, group)

    monkeypatch.setattr(HubLayout, "to_hub", counted)
    model = BUILDERS["mixtral"]()
    sync = savepoint.CheckpointManager(tmp_path / "sync")
    expected = read_manifest(sync.save(1, model=model))
    by_sync = sorted(converted)
    assert by_sync
    converted.clear()
    with savepoint.CheckpointManager(tmp_path / "thread", async_save=True) as mgr:
        path = mgr.save(1, model=model)
        mgr.wait()
        got = read_manifest(path)
        assert mgr._writer._arena.segments == 1
    assert sorted(converted) == by_sync
    assert _without_rng(got.files) == _without_rng(expected.files)
