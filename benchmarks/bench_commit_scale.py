"""Rank 0's commit and the restore vote at W = 1,000 and 10,000 ranks, from synthetic reports.

No processes: a temporary directory holds W ranks' empty files under the real layout (a DCP shard,
RNG state and one stateful object per rank), each rank's report is the dict it would send through the
gather, and rank 0 runs the real commit code on them (pipeline/commit.py): `take_reports` (a stat per
reported file), `cover_rest` (one walk, names only), the manifest and `commit` (fsync, rename). The
restore side times what every rank does with the W-rank manifest: parse it, and read the W votes.
Run: python -m benchmarks.bench_commit_scale [W ...]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import Any

from savepoint.manifest import build_manifest, parse_manifest
from savepoint.pipeline.commit import cover_rest, take_reports
from savepoint.pipeline.staging import SharedStagedDir

NOTES = [
    "per rank: train_state/dcp/__<r>_0.distcp, rng/rank-<r>.{json,safetensors}, stateful/rank-<r>/data.{json,safetensors}",
    "commit = take_reports + cover_rest + manifest + commit (fsync, rename), all on rank 0, files empty",
    "target: commit at 1,000 ranks under 1 s",
]


def rank_files(r: int) -> list[str]:
    ts = "train_state"
    return [
        f"{ts}/dcp/__{r}_0.distcp",
        f"{ts}/rng/rank-{r:05d}.json",
        f"{ts}/rng/rank-{r:05d}.safetensors",
        f"{ts}/stateful/rank-{r:05d}/data.json",
        f"{ts}/stateful/rank-{r:05d}/data.safetensors",
    ]


def simulate(world: int, workdir: str) -> dict[str, Any]:
    staged = SharedStagedDir(workdir, f"step-{world}")
    staged.write_bytes("metrics.json", b"")  # rank 0's own file, hashed by its writer
    empty = staged.entries["metrics.json"]
    reports: list[dict[str, tuple[int, str]]] = []
    for r in range(world):
        report = {}
        for rel in rank_files(r):
            os.makedirs(os.path.dirname(staged.abspath(rel)), exist_ok=True)
            open(staged.abspath(rel), "wb").close()
            report[rel] = empty
        reports.append(report)
    staged.entries.update(reports[0])
    start = time.perf_counter()
    take_reports(staged, reports)
    cover_rest(staged)
    manifest = build_manifest("model", staged.entries, step=1, world_size=world)
    raw = manifest.to_json()
    final = staged.commit(raw)
    commit_s = time.perf_counter() - start
    start = time.perf_counter()
    parsed = parse_manifest(raw, final)
    votes = [(r, None, None) for r in range(world)]  # what `agree` hands every rank at restore
    failed = {r: m for r, m, _ in votes if m is not None}
    restore_s = time.perf_counter() - start
    assert len(parsed.files) == 5 * world + 1 and not failed
    return {
        "ranks": world,
        "files": len(parsed.files),
        "rank 0 commit (s)": round(commit_s, 3),
        "manifest (MB)": round(len(raw) / 1e6, 2),
        "restore: parse + votes (s)": round(restore_s, 3),
    }


def run(worlds: tuple[int, ...] = (1_000, 10_000)) -> list[dict[str, Any]]:
    rows = []
    for world in worlds:
        with tempfile.TemporaryDirectory(prefix="commit-scale-") as workdir:
            rows.append(simulate(world, workdir))
    return rows


if __name__ == "__main__":
    for row in run(tuple(int(a) for a in sys.argv[1:]) or (1_000, 10_000)):
        print(row)
