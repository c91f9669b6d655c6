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
    sync_start = time.perf_counter()
    final = staged.commit(raw)
    commit_s, sync_s = time.perf_counter() - start, time.perf_counter() - sync_start
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
        "of which commit() (s)": round(sync_s, 3),
        "load avg": round(os.getloadavg()[0], 1),
        "manifest (MB)": round(len(raw) / 1e6, 2),
        "restore: parse + votes (s)": round(restore_s, 3),
    }


def notes(rows: list[dict[str, Any]]) -> list[str]:
    """NOTES plus what the per-rank files cost at 10,000 ranks: measured when a row is there, else
    extrapolated linearly from the largest world measured (both grow by a fixed amount per rank)."""
    largest = max(rows, key=lambda r: r["ranks"])
    at_10k = next((r for r in rows if r["ranks"] == 10_000), None)
    per_rank_files = len(rank_files(0))
    scale = 10_000 / largest["ranks"]
    manifest_mb = at_10k["manifest (MB)"] if at_10k else round(largest["manifest (MB)"] * scale, 1)
    parse_s = (
        at_10k["restore: parse + votes (s)"]
        if at_10k
        else round(largest["restore: parse + votes (s)"] * scale, 2)
    )
    how = "measured" if at_10k else f"extrapolated from {largest['ranks']:,} ranks"
    return [
        *NOTES,
        f"at 10,000 ranks ({how}): {per_rank_files} per-rank files each (a DCP shard, RNG .json/.safetensors, one "
        f"stateful object's .json/.safetensors), {per_rank_files * 10_000 + 1:,} manifest entries, a manifest of "
        f"{manifest_mb} MB ({manifest_mb * 1e6 / (per_rank_files * 10_000):.0f} bytes per entry) that every rank "
        f"parses at restore ({parse_s} s here), 20,000 files in train_state/rng/ and 10,000 directories under "
        "train_state/stateful/ (each synced by its own rank). The per-rank RNG and stateful files stay: they "
        "are what makes a resume exact, and each rank writes and reads only its own",
        "commit(): the manifest's fsync, one walk to pick the directories to sync, their syncs and the rename. "
        "Rank 0 syncs only the "
        "directories holding its own files or other directories (6 here); each other rank syncs the "
        "directories of its own files before it reports (in parallel, not timed here), so rank 0 makes no "
        "sync per rank. A sync waits on the disk's journal, so it grows with what else writes to the disk "
        "(load avg: 1-minute load average at the end of the row); the rest is O(W) work on small records",
        "command: python -m benchmarks.bench_commit_scale 1000 10000",
    ]


def run(worlds: tuple[int, ...] = (1_000, 10_000)) -> list[dict[str, Any]]:
    rows = []
    for world in worlds:
        with tempfile.TemporaryDirectory(prefix="commit-scale-") as workdir:
            rows.append(simulate(world, workdir))
    return rows


if __name__ == "__main__":
    for row in run(tuple(int(a) for a in sys.argv[1:]) or (1_000, 10_000)):
        print(row)
