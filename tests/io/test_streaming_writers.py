"""The streaming writers: header first, one tensor produced at a time, output equal to the library's."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from savepoint.formats.safetensors_io import write_safetensors, write_streamed
from savepoint.lora import math as lora_math
from savepoint.lora.blocked import BlockedMerger
from savepoint.storage.local import StagedDir


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    same_kind = a.dtype == b.dtype and a.shape == b.shape
    return same_kind and bool(a.reshape(-1).view(torch.uint8).equal(b.reshape(-1).view(torch.uint8)))


def test_written_file_loads_like_the_library_writes_it(tmp_path) -> None:
    tensors = {
        "bf16": torch.randn(33, 7).bfloat16(),
        "e4m3": torch.randn(5).to(torch.float8_e4m3fn),
        "e5m2": torch.randn(2, 2).to(torch.float8_e5m2),
        "bool": torch.tensor([True, False, True]),
        "i64": torch.tensor([-(2**62), 3]),
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(1.5),
        "strided": torch.randn(4, 6).T,  # not contiguous: written as its values, like the library
    }
    ours, theirs = str(tmp_path / "ours.safetensors"), str(tmp_path / "theirs.safetensors")
    with open(ours, "wb") as f:
        written = write_safetensors(f, tensors, {"format": "pt"})
    save_file({k: v.contiguous() for k, v in tensors.items()}, theirs, metadata={"format": "pt"})
    assert written == os.path.getsize(ours)
    a, b = load_file(ours), load_file(theirs)
    assert sorted(a) == sorted(b)
    for name in a:
        assert _same_bytes(a[name], b[name]), name


class _Recorder(io.BytesIO):
    def __init__(self, events: list[str]) -> None:
        super().__init__()
        self.events = events

    def write(self, data) -> int:  # type: ignore[no-untyped-def, override]
        self.events.append(f"write {memoryview(data).nbytes}")
        return super().write(data)


def test_tensors_are_made_one_at_a_time_while_earlier_ones_are_written() -> None:
    """The producer runs at most two tensors ahead of the disk: never a whole file's worth."""
    sizes = [1000 + i for i in range(8)]
    layout = {f"t{i}": (torch.uint8, (n,)) for i, n in enumerate(sizes)}
    events: list[str] = []

    def produce(name: str) -> torch.Tensor:
        events.append(f"produce {name}")
        return torch.full(layout[name][1], int(name[1:]), dtype=torch.uint8)

    out = _Recorder(events)
    write_streamed(out, layout, produce)

    written_before = {}  # tensor index -> how many tensors were fully written when it was produced
    writes = 0
    for e in events[1:]:  # events[0] is the header
        if e.startswith("produce"):
            written_before[int(e.split()[1][1:])] = writes
        else:
            writes += 1
    assert all(written_before[i] >= i - 2 for i in written_before), events
    out.seek(0)
    raw = out.getvalue()
    assert raw.endswith(b"".join(bytes([i]) * n for i, n in enumerate(sizes)))


def test_a_failed_write_stops_the_producer_and_is_raised() -> None:
    made: list[str] = []
    layout = {f"t{i}": (torch.float32, (4,)) for i in range(50)}

    class Full:
        calls = 0

        def write(self, data) -> int:  # type: ignore[no-untyped-def]
            Full.calls += 1
            if Full.calls > 2:
                raise OSError(28, "No space left on device")
            return memoryview(data).nbytes

    def produce(name: str) -> torch.Tensor:
        made.append(name)
        return torch.zeros(4)

    with pytest.raises(OSError, match="No space"):
        write_streamed(Full(), layout, produce)
    assert len(made) < 10, "kept producing after the disk failed"


def test_a_tensor_that_disagrees_with_the_header_is_refused() -> None:
    with pytest.raises(ValueError, match="came out as"):
        write_streamed(io.BytesIO(), {"a": (torch.float32, (2,))}, lambda n: torch.zeros(3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float32])
def test_blocked_merge_equals_the_plain_merge(
    dtype: torch.dtype, base_dtype: torch.dtype, monkeypatch
) -> None:
    import savepoint.lora.blocked as blocked

    monkeypatch.setattr(blocked, "BLOCK_ELEMENTS", 3 * 50)  # 3 rows per block; 37 rows leave a remainder
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 50, generator=g).to(base_dtype)
    a, b = torch.randn(4, 50, generator=g), torch.randn(37, 4, generator=g)
    before = w.clone()
    expected = lora_math.merge_linear(w, a, b, scaling=0.75).to(dtype)
    with BlockedMerger(workers=2) as merger:
        got = merger.merge_linear(w, a, b, scaling=0.75, dtype=dtype)
    assert got is not None and got.dtype == dtype and got.shape == expected.shape
    # BLAS may order a block's rank-4 dot products differently: rounding-level differences only.
    eps = torch.finfo(dtype).eps
    assert torch.allclose(got.float(), expected.float(), rtol=eps, atol=max(eps, 1e-5))
    assert torch.equal(w, before), "the base weight was modified"


def test_blocked_merge_hands_overflow_back_to_the_checked_path() -> None:
    w = torch.full((8, 8), 60000.0)
    a, b = torch.ones(1, 8), torch.ones(8, 1)
    with BlockedMerger(workers=1) as merger:
        assert merger.merge_linear(w, a, b, scaling=10000.0, dtype=torch.float16) is None
        assert merger.merge_linear(w, a, b, scaling=10000.0, dtype=torch.float32) is not None


def test_consolidate_streams_batches_into_one_shard(tmp_path, monkeypatch) -> None:
    """consolidate's writer loads DCP tensors in bounded batches and writes them as they arrive."""
    import torch.distributed.checkpoint as dcp

    import savepoint.consolidate as consolidate

    state = {f"model.layer{i}.weight": torch.randn(16, 8) for i in range(5)}
    state["model.head.bias"] = torch.arange(8, dtype=torch.int64)
    dcp_dir = str(tmp_path / "dcp")
    dcp.save(state, storage_writer=dcp.FileSystemWriter(dcp_dir), no_dist=True)
    loads: list[int] = []
    real_load = dcp.load

    def counting_load(buffers, **kwargs):  # type: ignore[no-untyped-def]
        loads.append(len(buffers))
        return real_load(buffers, **kwargs)

    monkeypatch.setattr(dcp, "load", counting_load)
    monkeypatch.setattr(consolidate, "_BATCH_BYTES", 2 * 16 * 8 * 4)  # two weights per load
    from savepoint.formats.dcp_reader import read_dcp_metadata

    metadata = read_dcp_metadata(dcp_dir, "")
    names = consolidate._tensor_plan(metadata)
    staged = StagedDir(str(tmp_path), "out")
    consolidate._write_shards(dcp_dir, metadata, names, staged, "5GB", torch.bfloat16, None)

    written = load_file(os.path.join(staged.path, "model.safetensors"))
    assert max(loads) <= 2 and sum(loads) == len(state)
    for name, (key, _, _) in names.items():
        expected = state[key].to(torch.bfloat16) if state[key].is_floating_point() else state[key]
        assert _same_bytes(written[name], expected), name
    staged.abort()


def test_buffer_pool_recycles_only_what_it_handed_out() -> None:
    from savepoint.io.memory import BufferPool

    pool = BufferPool(keep=2)
    a = pool.take((4 << 20,), torch.float32)  # 16 MB: large enough to pool
    first = a.untyped_storage().data_ptr()
    pool.give(torch.empty(4 << 20))  # not the pool's: ignored
    pool.give(a)
    del a
    b = pool.take((1 << 20, 4), torch.bfloat16)  # 8 MB: fits in the recycled buffer
    assert b.untyped_storage().data_ptr() == first and b.shape == (1 << 20, 4)
    c = pool.take((4 << 20,), torch.float32)  # the recycled one is in use again: a new buffer
    assert c.untyped_storage().data_ptr() != first
    small = pool.take((10,), torch.float32)
    pool.give(small)  # small tensors are never pooled


def test_buffer_pool_serves_mixed_sizes_and_keeps_a_bounded_number() -> None:
    from savepoint.io.memory import BufferPool

    pool = BufferPool(keep=2)
    sizes = [(3 << 20,), (5 << 20,), (4 << 20,)]  # float32: 12, 20 and 16 MB
    taken = [pool.take(s, torch.float32) for s in sizes]
    for t in taken:
        pool.give(t)
    assert len(pool._idle) == 2  # the 12 MB one was dropped
    again = pool.take((4 << 20,), torch.float32)  # the 16 MB buffer is the best fit
    assert again.untyped_storage().data_ptr() == taken[2].untyped_storage().data_ptr()


_SAVE_PEAK = """
import resource, sys, tempfile, torch, transformers
import savepoint
def llama(layers, hidden, inter):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=1024, hidden_size=hidden,
        intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2))
model = llama(4, 384, 1024)  # about 32 MB of float32, saved as ONE bf16 file
with tempfile.TemporaryDirectory() as tmp:
    savepoint.save_pretrained(llama(1, 64, 128), tmp + "/warm-up", dtype="bf16")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    savepoint.save_pretrained(model, tmp + "/out", dtype="bf16")
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
print(grown / sum(p.numel() * p.element_size() for p in model.parameters()))
"""


def test_save_pretrained_casts_without_a_second_copy_of_the_model() -> None:
    """A model in memory saved as one bf16 file: the cast copy (half the float32 model) or a shard
    buffer (the same) would grow the peak by 0.5x; streaming grows it by a few tensors."""
    done = subprocess.run(
        [sys.executable, "-c", _SAVE_PEAK], capture_output=True, text=True, check=True, timeout=300
    )
    grown = float(done.stdout.strip().splitlines()[-1])
    assert grown < 0.25, f"peak memory grew by {grown:.2f}x the model's size during the save"
