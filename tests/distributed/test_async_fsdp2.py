"""`async_save=True` under torchrun with an FSDP2 model (2 ranks, gloo): each rank snapshots its DTensor
shards into reused host buffers and returns; DCP writes them in the background on savepoint's own
group. The checks run inside the worker (worker_async_fsdp2.py); this reads what it reported."""

from __future__ import annotations

import json

import pytest
from tests.distributed.common import torchrun

pytestmark = pytest.mark.slow


def test_async_fsdp2_saves_the_save_time_state_in_both_modes_and_reuses_its_buffers(tmp_path):
    torchrun("worker_async_fsdp2.py", str(tmp_path), timeout=400)
    per_rank = json.loads((tmp_path / "result.json").read_text())
    assert len(per_rank) == 2
    for rank, result in enumerate(per_rank):
        for mode in ("gathered", "sharded"):
            assert result[mode]["restored_step"] == 2, (rank, mode)
        assert result["reuse"]["saves"] == 24, rank
        assert result["reuse"]["pool_bytes"] > 0, rank
    assert per_rank[0]["gathered"]["tensors_compared"] > 10  # rank 0 compared the full gathered state
    # sharded_model=False: save() copied each rank's weight shards; the write phase gathered them to rank 0
    assert [r["gathered"]["deferred_gather"] for r in per_rank] == [True, True]
    assert [r["sharded"]["deferred_gather"] for r in per_rank] == [False, False]
