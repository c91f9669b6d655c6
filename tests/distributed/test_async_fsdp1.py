"""`async_save=True` under torchrun with an FSDP1 model (2 ranks, gloo): each rank snapshots its
ShardedTensor (or, with a `device_mesh=`, DTensor) shards into reused host buffers and returns; the
write runs in the background. The checks run inside the worker (worker_async_fsdp1.py); this reads what
it reported."""

from __future__ import annotations

import json

import pytest
from tests.distributed.common import torchrun

pytestmark = pytest.mark.slow


def test_async_fsdp1_saves_the_save_time_state_and_resumes_exactly(tmp_path):
    torchrun("worker_async_fsdp1.py", str(tmp_path), timeout=400)
    per_rank = json.loads((tmp_path / "result.json").read_text())
    assert len(per_rank) == 2
    for rank, result in enumerate(per_rank):
        # What the background write got: the layouts torch 2.13 hands out for FSDP1 (item 1 of issue 14)
        assert result["gathered"]["kinds"] == ["ShardedTensor", "Tensor"], rank  # moments; AdamW's steps
        assert result["sharded"]["kinds"] == ["ShardedTensor", "Tensor"], rank  # weights and moments
        assert result["sharded-mesh"]["kinds"] == ["DTensor", "Tensor"], rank
        for case in ("gathered", "sharded", "sharded-mesh"):
            assert len(result[case]["losses"]) == 3, (rank, case)
            assert result[case]["resumed"] == result[case]["losses"], (rank, case)
        assert result["uneven"]["sharded_tensors"] == 12, rank  # 4 weights and biases, 8 AdamW moments
        assert result["reuse"]["saves"] == 4 and result["reuse"]["pool_bytes"] > 0, rank
    # the second layer has one output row: rank 1 holds no shard of its weight, bias or their 2 moments each
    assert [r["uneven"]["without_local"] for r in per_rank] == [0, 6]
    assert per_rank[0]["sharded"]["compared"] > 10  # rank 0 compared the full gathered state
