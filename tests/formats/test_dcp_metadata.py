"""savepoint's allow-list reader of DCP's `.metadata` gives back what torch's own reader gives, and the
sharded layout built in tests/reliability/test_hostile_formats.py is one savepoint restores exactly:
the controls for the hostile classes there."""

from __future__ import annotations

import io
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from tests.reliability.scenarios import compare, same, train_state
from tests.reliability.test_hostile_formats import make_sharded

import savepoint
from savepoint.consolidate import consolidate
from savepoint.errors import CorruptCheckpointError
from savepoint.formats.dcp_metadata import parse_metadata
from savepoint.formats.dcp_reader import load_tensors, read_dcp_metadata


def save_dcp(path: Path, state: dict[str, torch.Tensor]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(path)), no_dist=True)


STATE = {
    "model.w": torch.randn(6, 4),
    "model.half": torch.randn(3).to(torch.bfloat16),
    "optim.w.step": torch.tensor(3.0),
    "ids": torch.arange(5, dtype=torch.int64),
    "flags": torch.tensor([True, False]),
}


def test_reads_what_torch_reads(tmp_path: Path) -> None:
    save_dcp(tmp_path / "d", STATE)
    with open(tmp_path / "d" / ".metadata", "rb") as f:
        theirs = pickle.load(f)  # our own file, written a moment ago
    ours = read_dcp_metadata(str(tmp_path / "d"), "")
    assert ours.state_dict_metadata.keys() == theirs.state_dict_metadata.keys()
    for key, meta in theirs.state_dict_metadata.items():
        mine = ours.state_dict_metadata[key]
        assert (mine.size, mine.properties.dtype, mine.chunks) == (
            meta.size,
            meta.properties.dtype,
            meta.chunks,
        )
    assert {
        (i.fqn, i.offset): (e.relative_path, e.offset, e.length) for i, e in ours.storage_data.items()
    } == {(i.fqn, i.offset): (e.relative_path, e.offset, e.length) for i, e in theirs.storage_data.items()}
    buffers = {k: torch.zeros_like(v) for k, v in STATE.items()}
    load_tensors(str(tmp_path / "d"), ours, buffers, checkpoint=str(tmp_path))
    assert same(buffers, STATE) == []


def test_chunks_written_by_several_ranks(tmp_path: Path) -> None:
    """A tensor in two chunks (as two ranks write it), each in its own file."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    save_dcp(tmp_path / "d", {"w": torch.randn(4, 2)})
    with open(tmp_path / "d" / ".metadata", "rb") as f:
        md = pickle.load(f)
    full = torch.arange(8, dtype=torch.float32).reshape(4, 2)
    entry_type = type(next(iter(md.storage_data.values())))
    chunks = [ChunkStorageMetadata(torch.Size([2 * r, 0]), torch.Size([2, 2])) for r in (0, 1)]
    md.state_dict_metadata["w"].chunks = chunks
    md.storage_data = {}
    for rank, chunk in enumerate(chunks):
        buf = io.BytesIO()
        torch.save(full[2 * rank : 2 * rank + 2].clone(), buf)
        (tmp_path / "d" / f"__{rank}_0.distcp").write_bytes(buf.getvalue())
        md.storage_data[MetadataIndex("w", chunk.offsets, rank)] = entry_type(
            f"__{rank}_0.distcp", 0, len(buf.getvalue())
        )
    sizes = {n: os.path.getsize(tmp_path / "d" / n) for n in ("__0_0.distcp", "__1_0.distcp")}
    ours = parse_metadata(pickle.dumps(md), sizes, checkpoint=str(tmp_path), relpath=".metadata")
    out = {"w": torch.zeros(4, 2)}
    load_tensors(str(tmp_path / "d"), ours, out, checkpoint=str(tmp_path))
    assert torch.equal(out["w"], full)

    md.state_dict_metadata["w"].chunks.pop()  # half the tensor has no bytes behind it
    md.storage_data.pop(next(k for k in md.storage_data if k.offset[0] == 2))
    with pytest.raises(CorruptCheckpointError, match=r"hold 4 elements"):
        parse_metadata(pickle.dumps(md), sizes, checkpoint=str(tmp_path), relpath=".metadata")


def test_truncated_or_foreign_bytes_are_corrupt_not_a_crash(tmp_path: Path) -> None:
    save_dcp(tmp_path / "d", STATE)
    raw = (tmp_path / "d" / ".metadata").read_bytes()
    for bad in (raw[: len(raw) // 2], b"", b"not a pickle", pickle.dumps({"a": 1}), pickle.dumps([1] * 10)):
        with pytest.raises(CorruptCheckpointError, match=r"\.metadata"):
            parse_metadata(bad, {"__0_0.distcp": 10**6}, checkpoint=str(tmp_path), relpath=".metadata")


def test_hostile_layout_control_restores_and_consolidates_exactly(tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    state = train_state(1)
    with savepoint.CheckpointManager(root) as mgr:
        mgr.save(1, model=state.model, **state.kwargs)
    ckpt = make_sharded(root)
    savepoint.verify(ckpt)
    fresh = train_state(1, fresh=True)
    kwargs = {k: fresh.kwargs[k] for k in ("optimizer", "scheduler", "stateful")}
    assert savepoint.CheckpointManager(root).restore(model=fresh.model, step=1, **kwargs).step == 1
    assert compare(fresh, train_state(1)) == []
    out = consolidate(ckpt, tmp_path / "out")
    assert (
        same(load_file(os.path.join(out, "model.safetensors")), dict(train_state(1).model.state_dict())) == []
    )
