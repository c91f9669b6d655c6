"""Which directories rank 0 fsyncs at commit: those holding its own files or other directories, never one
that holds only another rank's files (that rank synced it before reporting), so the commit makes a few
directory syncs whatever the world size, instead of one per rank's stateful directory."""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks.bench_commit_scale import rank_files

from savepoint.pipeline.commit import cover_rest, sync_own_dirs, take_reports
from savepoint.pipeline.staging import SharedStagedDir


def test_rank0_syncs_no_directory_only_other_ranks_wrote(tmp_path: Path) -> None:
    staged = SharedStagedDir(str(tmp_path), "step-1")
    staged.write_bytes("metrics.json", b"{}")
    reports = []
    for r in range(3):
        writer = staged if r == 0 else SharedStagedDir.join(str(tmp_path), "step-1", staged.path)
        for rel in rank_files(r):
            writer.write_bytes(rel, b"x")
        if r:
            sync_own_dirs(writer)  # what each other rank does before it reports
        reports.append(dict(writer.entries))
    take_reports(staged, reports)
    cover_rest(staged)
    synced = {os.path.relpath(d, staged.path) for d in staged.dirs_to_sync()}
    assert synced == {
        ".",
        "train_state",
        "train_state/dcp",
        "train_state/rng",
        "train_state/stateful",
        "train_state/stateful/rank-00000",
    }
    # the plain (one-process) directory syncs every directory
    assert len(list(super(SharedStagedDir, staged).dirs_to_sync())) == len(synced) + 2
    final = staged.commit(b"{}")
    assert sorted(os.listdir(os.path.join(final, "train_state", "stateful"))) == [
        "rank-00000",
        "rank-00001",
        "rank-00002",
    ]
