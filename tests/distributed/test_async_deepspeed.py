"""`async_save=True` with DeepSpeed ZeRO engines under torchrun (2 ranks, gloo, CPU): save() takes the
engine's own checkpoint into host buffers and returns; training goes on while the files are written and
committed in the background. The checks run inside the worker (worker_async_deepspeed.py): the files
are byte for byte what DeepSpeed's own `save_checkpoint` writes at save time, a restore holds the
save-time state and trains on as DeepSpeed's own loader does, a failed background write is raised on
every rank and commits nothing."""

from __future__ import annotations

import json
import os

import pytest
from tests.distributed.common import torchrun

pytestmark = pytest.mark.slow
os.environ.setdefault("DS_ACCELERATOR", "cpu")
pytest.importorskip("deepspeed")


def test_async_engine_save_writes_deepspeeds_own_bytes_of_the_save_time_state(tmp_path) -> None:
    torchrun("worker_async_deepspeed.py", str(tmp_path), "2", "3", timeout=400)  # ZeRO-2, then ZeRO-3
    per_rank = json.loads((tmp_path / "result.json").read_text())
    assert len(per_rank) == 2
    for result in per_rank:
        assert result["zero2"]["files"] == 3  # model states (written by rank 0) and both optimizer partitions
        assert result["zero3"]["files"] == 4  # every rank its model states and its optimizer partition
    assert per_rank[0]["zero2"]["compared"] > 20  # rank 0 also compared the gathered weights
