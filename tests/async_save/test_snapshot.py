"""snapshot_job: host copies taken at save() time, in reused buffers; async saves hold save-time values."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from tests.async_save.helpers import WriterGate, clone_state, mutate, trained_llama

import savepoint
from savepoint import snapshot
from savepoint.errors import SavepointError
from savepoint.pipeline.job import SaveRequest
from savepoint.pipeline.save import capture


def test_checkpoint_holds_save_time_values_although_training_changed_them(tmp_path, monkeypatch):
    model, opt = trained_llama()
    expected = clone_state(model, opt)
    gate = WriterGate(monkeypatch)
    mgr = savepoint.CheckpointManager(tmp_path / "run", async_save=True)
    mgr.save(3, model=model, optimizer=opt)
    mutate(model, opt)  # the next step runs at once, before the background write even starts
    gate.open()
    mgr.wait()

    fresh, fresh_opt = trained_llama(steps=0)
    result = mgr.restore(model=fresh, optimizer=fresh_opt)
    assert result.step == 3
    for name, value in fresh.state_dict().items():
        torch.testing.assert_close(value, expected["weights"][name], rtol=0, atol=0, msg=name)
    restored = clone_state(fresh, fresh_opt)["moments"]
    assert restored.keys() == expected["moments"].keys()
    for key, value in restored.items():
        torch.testing.assert_close(value, expected["moments"][key], rtol=0, atol=0, msg=str(key))


def test_snapshot_reuses_the_same_host_buffers_across_saves(tmp_path):
    model, opt = trained_llama()
    root = str(tmp_path / "run")

    def snap() -> dict[str, torch.Tensor]:
        job = capture(SaveRequest(root=root, step=1, model=model, optimizer=opt), snapshot=True)
        tensors = dict(job.model_state)
        tensors.update({f"{rb}:{k}": t for rb, (_doc, ts) in job.blobs.items() for k, t in ts.items()})
        return tensors

    first = {k: t.untyped_storage().data_ptr() for k, t in snap().items()}
    mutate(model, opt)
    second_tensors = snap()
    second = {k: t.untyped_storage().data_ptr() for k, t in second_tensors.items()}
    assert first == second
    live = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert not live & set(second.values()), "a snapshot must not alias the live tensors"
    for name, value in model.state_dict().items():
        if name in second_tensors:
            torch.testing.assert_close(second_tensors[name], value, rtol=0, atol=0)
    snapshot.release_buffers(root)


def test_buffers_of_tensors_that_changed_shape_are_dropped(tmp_path):
    root = str(tmp_path / "run")
    pool = snapshot.pool_for(root)
    for shape in [(4, 4), (2, 8)]:
        pool.begin()
        pool.copy("w", torch.ones(shape))
        pool.end()
    assert pool.nbytes == 2 * 8 * 4
    snapshot.release_buffers(root)
    assert snapshot.pool_for(root).nbytes == 0


def test_noncontiguous_and_empty_tensors_are_copied_exactly(tmp_path):
    pool = snapshot.pool_for(str(tmp_path))
    src = torch.arange(12.0).reshape(3, 4).t()
    pool.begin()
    copies = [pool.copy("t", src), pool.copy("e", torch.empty(0, 3))]
    pool.end()
    torch.testing.assert_close(copies[0], src, rtol=0, atol=0)
    assert copies[1].shape == (0, 3)
    snapshot.release_buffers(str(tmp_path))


def test_an_adapter_without_a_state_snapshot_is_refused_not_written_racily(tmp_path):
    job = capture(SaveRequest(root=str(tmp_path), step=1, model=torch.nn.Linear(2, 2)), snapshot=False)
    job.adapter = object()  # a LoRA job whose capture did not take the adapter's tensors
    with pytest.raises(SavepointError, match="adapter_state"):
        snapshot.snapshot_job(job)


def test_an_adapter_state_is_snapshotted_when_the_job_carries_one(tmp_path):
    job = capture(SaveRequest(root=str(tmp_path), step=1, model=torch.nn.Linear(2, 2)), snapshot=False)
    live = torch.ones(3)
    job.adapter, job.adapter_state = object(), {"default": {"lora_A": live}}
    snapshot.snapshot_job(job)
    live.add_(1)
    assert torch.equal(job.adapter_state["default"]["lora_A"], torch.ones(3))
    snapshot.release_buffers(str(tmp_path))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_tensors_go_to_pinned_buffers_and_are_complete_on_return(tmp_path):
    pool = snapshot.pool_for(str(tmp_path))
    src = torch.randn(1024, 1024, device="cuda")
    pool.begin()
    copy = pool.copy("w", src)
    pool.end()
    assert copy.is_pinned() and copy.device.type == "cpu"
    src.add_(1)
    torch.testing.assert_close(copy, (src - 1).cpu(), rtol=0, atol=0)
    snapshot.release_buffers(str(tmp_path))


def test_the_checkpoint_files_hold_the_snapshot(tmp_path, monkeypatch):
    model = torch.nn.Linear(8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gate = WriterGate(monkeypatch)
    with savepoint.CheckpointManager(tmp_path / "run", async_save=True) as mgr:
        path = mgr.save(1, model=model)
        with torch.no_grad():
            model.weight.zero_()
        gate.open()
    on_disk = load_file(f"{path}/model.safetensors")
    for k, v in before.items():
        assert torch.equal(on_disk[k], v)
