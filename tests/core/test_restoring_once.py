"""A single-process restore reads each file once and checks it in that read: `/proc/self/io` counts
the bytes, and damage anywhere in what a restore reads (weights, optimizer blob, a header that parses
as another model, a side file) is a CorruptCheckpointError before any live object changes, or a
fallback to the previous step for "latest"."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tests.core.test_manager import make_run, train_steps

import savepoint
from savepoint.errors import CorruptCheckpointError, Problem
from savepoint.formats.dcp_ranges import RangeCheckedStream

SLACK = 64 * 1024  # the manifests a manager lists, /proc reads: small next to the checkpoint


def rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"model/{k}": v.clone() for k, v in model.state_dict().items()}
    for i, entry in enumerate(opt.state.values()):
        out.update({f"optim/{i}/{k}": v.clone() for k, v in entry.items() if isinstance(v, torch.Tensor)})
    return out


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(params=["one-file", "sharded"])
def run(tmp_path: Path, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    model, opt, sched = make_run()
    shard = "5GB" if request.param == "one-file" else 200_000  # several files and an index
    mgr = savepoint.CheckpointManager(tmp_path / "run", max_shard_size=shard)
    train_steps(model, opt, 1)
    mgr.save(1, model=model, optimizer=opt, scheduler=sched)
    at1 = snapshot(model, opt)
    train_steps(model, opt, 1, seed=1)
    mgr.save(2, model=model, optimizer=opt, scheduler=sched)
    at2 = snapshot(model, opt)
    index = Path(mgr.root) / "step-00000002" / "model.safetensors.index.json"
    assert index.exists() == (request.param == "sharded")
    return mgr, model, opt, sched, at1, at2


def flip(path: Path, offset: int | None = None) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2 if offset is None else offset)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_restore_reads_each_file_once(run) -> None:  # type: ignore[no-untyped-def]
    mgr, model, opt, sched, _, at2 = run
    mgr.restore(model=model, optimizer=opt, scheduler=sched, step=1)  # warm-up: imports, first use
    files = json.loads((Path(mgr.root) / "step-00000002" / "savepoint.json").read_text())["files"]
    total = sum(e["size"] for e in files.values())
    before = rchar()
    assert mgr.restore(model=model, optimizer=opt, scheduler=sched, step=2).step == 2
    read = rchar() - before
    assert same(at2, snapshot(model, opt))
    assert total <= read <= total + SLACK, (read, total)  # verify-then-read read about 2 * total


def test_damaged_weights_fall_back_and_change_nothing(run) -> None:  # type: ignore[no-untyped-def]
    mgr, model, opt, sched, at1, at2 = run
    weights = sorted((Path(mgr.root) / "step-00000002").glob("model*.safetensors"))
    flip(weights[-1])
    with pytest.raises(CorruptCheckpointError, match=rf"{weights[-1].name}: checksum mismatch"):
        mgr.restore(model=model, optimizer=opt, scheduler=sched, step=2)
    assert same(at2, snapshot(model, opt))  # read into buffers of its own: nothing changed
    with pytest.warns(UserWarning, match="falling back"):
        assert mgr.restore(model=model, optimizer=opt, scheduler=sched).step == 1
    assert same(at1, snapshot(model, opt))


@pytest.mark.parametrize(
    "relpath", ["train_state/optimizer.safetensors", "train_state/scheduler.json", "config.json"]
)
def test_damage_in_state_or_side_files_changes_nothing(run, relpath: str) -> None:  # type: ignore[no-untyped-def]
    mgr, model, opt, sched, _, at2 = run
    train_steps(model, opt, 1, seed=5)
    now = snapshot(model, opt)
    flip(Path(mgr.root) / "step-00000002" / relpath)
    with pytest.raises(CorruptCheckpointError, match=f"{relpath}: checksum mismatch"):
        mgr.restore(model=model, optimizer=opt, scheduler=sched, step=2)
    assert same(now, snapshot(model, opt)) and not same(now, at2)


def test_header_that_reads_as_another_model_is_damage_not_a_mismatch(run) -> None:  # type: ignore[no-untyped-def]
    mgr, model, opt, sched, _, _ = run
    path = next(
        p
        for p in (Path(mgr.root) / "step-00000002").glob("model*.safetensors")
        if b'"model.norm.weight"' in p.read_bytes()
    )
    data = path.read_bytes()
    at = data.index(b'"model.norm.weight"')  # same length: the header still parses, names differ
    path.write_bytes(data[:at] + b'"model.norm.weighs"' + data[at + len(b'"model.norm.weight"') :])
    with pytest.raises(CorruptCheckpointError, match=rf"{path.name}: checksum mismatch"):
        mgr.restore(model=model, optimizer=opt, scheduler=sched, step=2)


def test_range_checked_stream_serves_only_checked_items(tmp_path: Path) -> None:
    import xxhash

    data = bytes(range(256)) * 4
    path = tmp_path / "__0_0.distcp"
    path.write_bytes(data)
    ranges = [(0, 512, xxhash.xxh3_128(data[:512]).hexdigest()), (512, 256, "0" * 32)]

    def fail(reason: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(str(tmp_path), [Problem(path.name, reason)])

    with RangeCheckedStream(os.open(path, os.O_RDONLY), ranges, fail) as stream:
        stream.seek(100)
        assert stream.read(50) == data[100:150]
        stream.seek(0)
        assert stream.read(512) == data[:512] and stream.bytes_read == 512  # the item read once
        with pytest.raises(
            CorruptCheckpointError, match=r"checksum mismatch in the item at bytes 512\.\.768"
        ):
            stream.read(10)
        stream.seek(800)
        with pytest.raises(CorruptCheckpointError, match="lie in no item"):
            stream.read(1)
