"""What a 2-rank restore reads, with real torchrun processes (gloo, CPU): each rank reads its own DCP
shard bytes once, checked against their recorded item checksums while it reads them; damage inside
bytes only one rank reads makes every rank fall back to the previous step together; a checkpoint
without item checksums (written before them) still restores, verified whole first."""

from __future__ import annotations

import json

import pytest
from tests.distributed.common import torchrun

pytestmark = pytest.mark.slow
SLACK = 128 * 1024  # manifests, DCP metadata, item records, JSON blobs: small next to the shards


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("restore-reads")
    torchrun("worker_restore_reads.py", str(out), timeout=300)
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]


def test_each_rank_reads_its_shard_bytes_once(reports: list[dict]) -> None:
    for rank, report in enumerate(reports):
        assert (report["read_step"], report["read_state"]) == (2, "exact"), report
        # its own shard file once, nothing of the other rank's (verify-then-read read both, then its own)
        assert report["own_shard"] <= report["read"] <= report["own_shard"] + SLACK, (rank, report)
        assert report["read"] < report["all_shards"], (rank, report)


def test_damage_one_rank_reads_makes_every_rank_fall_back_together(reports: list[dict]) -> None:
    for rank, report in enumerate(reports):
        assert (report["damaged_step"], report["damaged_state"]) == (1, "exact"), (rank, report)
        [warning] = report["warnings"]
        assert "__1_0.distcp: checksum mismatch in the item at bytes" in warning, warning
        assert "reported by rank" in warning and "1" in warning.split("reported by rank")[1], warning


def test_checkpoint_without_item_checksums_is_verified_whole_then_read(reports: list[dict]) -> None:
    for rank, report in enumerate(reports):
        assert (report["old_step"], report["old_state"]) == (2, "exact"), (rank, report)
        assert report["old"] >= report["all_shards"] + report["own_shard"], (rank, report)


def test_full_weight_files_are_read_once_into_the_shards(reports: list[dict]) -> None:
    for rank, report in enumerate(reports):
        assert (report["full_step"], report["full_state"]) == (2, "exact"), (rank, report)
        needed = report["full_weights"] + report["full_own_shard"]
        assert needed <= report["full"] <= needed + SLACK, (rank, report)
