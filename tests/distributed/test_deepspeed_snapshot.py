"""The host copies an async DeepSpeed save takes (deepspeed_snapshot.HostSnapshot), in one process: what
`torch.save` writes from the copy is byte for byte what it writes from the live state, whatever ZeRO
puts in it (views of one flat buffer, a view flagged requires_grad, a tagged tensor, aliases, mapping
and tuple types); the copy no longer follows the live tensors; the buffers are reused from save to
save and released with the root's own pool."""

from __future__ import annotations

import collections
import gc
import io
import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
pytest.importorskip("deepspeed")

from savepoint.integrations.deepspeed_snapshot import HostSnapshot, engine_pool
from savepoint.snapshot import pool_for, release_buffers

Pair = collections.namedtuple("Pair", "first second")


def zero_like_state(step: int) -> dict:
    flat = torch.arange(40, dtype=torch.float32) * step  # ZeRO-1/2: parameters are views of one buffer
    master = torch.ones(12, requires_grad=True) * step  # a view flagged requires_grad, as ZeRO's partitions
    tagged = torch.full((3,), float(step))
    tagged.ds_id = f"0_{step}"  # ZeRO-3 tags its fp32 partitions; torch.save pickles the attribute
    weight = flat[:20].view(4, 5)
    return {
        "module": collections.OrderedDict(weight=weight, bias=flat[20:24], tied=weight),
        "optimizer_state_dict": {
            "single_partition_of_fp32_groups": [master[2:10]],
            "fp32_flat_groups": [tagged],
            "param": torch.nn.Parameter(torch.zeros(2)),
            "shapes": [collections.OrderedDict(weight=torch.Size([4, 5]))],
            "pair": Pair(flat[24:26], 3),
            "loss_scale": 1.5,
            "step": torch.tensor(step),
        },
        "ds_version": "0.19.8",
    }


def saved_bytes(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def test_torch_save_of_the_copy_is_the_bytes_of_the_live_state_and_stops_following_it(tmp_path) -> None:
    pool = engine_pool(str(tmp_path))
    live = zero_like_state(2)
    pool.begin()
    copy = HostSnapshot(pool, "zero_pp_rank_0_mp_rank_00_optim_states.pt").of(live)
    pool.end()
    assert saved_bytes(copy) == saved_bytes(live)
    module = copy["module"]
    assert type(module) is collections.OrderedDict and module["tied"] is module["weight"]
    assert module["weight"].untyped_storage().data_ptr() == module["bias"].untyped_storage().data_ptr()
    expected = saved_bytes(live)
    live["module"]["weight"].add_(1)  # training goes on
    live["optimizer_state_dict"]["step"].add_(1)
    assert saved_bytes(copy) == expected


def test_buffers_are_reused_from_save_to_save_and_released_with_the_roots_pool(tmp_path) -> None:
    root = str(tmp_path)
    pointers = []
    for step in (1, 2, 3):
        pool = engine_pool(root)
        pool.begin()
        copy = HostSnapshot(pool, "mp_rank_00_model_states.pt").of(zero_like_state(step))
        pool.end()
        assert torch.equal(copy["module"]["bias"], torch.arange(20, 24, dtype=torch.float32) * step)
        pointers.append(copy["module"]["weight"].untyped_storage().data_ptr())
        del copy
    assert len(set(pointers)) == 1, pointers
    assert engine_pool(root).nbytes > 0 and engine_pool(root) is pool
    release_buffers(root)  # as the manager does when it closes
    gc.collect()
    assert engine_pool(root) is not pool and engine_pool(root).nbytes == 0
    assert pool_for(root) is not None
