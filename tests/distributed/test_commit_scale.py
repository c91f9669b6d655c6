"""Rank 0's commit from many ranks' reports: real commit code on synthetic reports, no processes."""

from __future__ import annotations

from pathlib import Path

import pytest
from benchmarks import bench_commit_scale

from savepoint.distributed import DistributedSaveError
from savepoint.pipeline.commit import cover_rest, take_reports
from savepoint.pipeline.staging import SharedStagedDir


def test_commit_of_a_hundred_ranks_lists_every_file(tmp_path: Path) -> None:
    row = bench_commit_scale.simulate(100, str(tmp_path))
    assert row["files"] == 501
    assert row["rank 0 commit (s)"] < 5


def _staged_with_reports(tmp_path: Path) -> tuple[SharedStagedDir, list[dict[str, tuple[int, str]]]]:
    staged = SharedStagedDir(str(tmp_path), "step-1")
    staged.write_bytes("metrics.json", b"{}")
    other = SharedStagedDir.join(str(tmp_path), "step-1", staged.path)
    other.write_bytes("train_state/rng/rank-00001.json", b"{}")
    return staged, [dict(staged.entries), dict(other.entries)]


def test_a_file_no_rank_reported_fails_the_commit(tmp_path: Path) -> None:
    staged, reports = _staged_with_reports(tmp_path)
    Path(staged.abspath("train_state/dcp")).mkdir(parents=True)
    Path(staged.abspath("train_state/dcp/__7_0.distcp")).write_bytes(b"x")
    take_reports(staged, reports)
    with pytest.raises(DistributedSaveError, match=r"reported by no rank: train_state/dcp/__7_0\.distcp"):
        cover_rest(staged)


def test_a_reported_file_of_another_size_fails_the_commit(tmp_path: Path) -> None:
    staged, reports = _staged_with_reports(tmp_path)
    size, checksum = reports[1]["train_state/rng/rank-00001.json"]
    reports[1]["train_state/rng/rank-00001.json"] = (size + 1, checksum)
    with pytest.raises(DistributedSaveError, match="does not see 1 file"):
        take_reports(staged, reports)


def test_rank0_hashes_only_its_own_unlisted_files(tmp_path: Path) -> None:
    staged, reports = _staged_with_reports(tmp_path)
    Path(staged.abspath("tokenizer.json")).write_bytes(b"{}")  # rank 0's, written by another library
    take_reports(staged, reports)
    cover_rest(staged)
    assert set(staged.entries) == {"metrics.json", "tokenizer.json", "train_state/rng/rank-00001.json"}
