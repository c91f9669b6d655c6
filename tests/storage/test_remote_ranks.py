"""Collective saves and restores through an `s3://` root (moto on 127.0.0.1), under real torchrun.

Every rank stages on its own disk, uploads its own files and reads back only its part; rank 0 uploads
the manifest last. Run as 2 ranks on one node, and as 2 "nodes" (`--nnodes=2`, one rank each) whose
staging dirs ($SAVEPOINT_CACHE) differ: nothing but the store is shared.
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import fsspec
import pytest
import torch
from safetensors.torch import load_file
from tests.distributed.common import REPO, TORCHRUN, assert_same, plain_reference, worker_env

import savepoint
from savepoint.demo import tiny
from savepoint.storage.remote import RemoteRoot

pytestmark = pytest.mark.slow
WORKER = str(REPO / "tests" / "distributed" / "worker_s3.py")
STEP = "step-00000002"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_one_node(mode: str, root: str, out: Path, cache: Path, *how: str) -> None:
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node=2", WORKER, mode, root, str(out), *how]
    proc = subprocess.run(
        cmd, env=worker_env(SAVEPOINT_CACHE=str(cache)), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"{mode} exited {proc.returncode}\n{proc.stderr[-6000:]}"


def run_two_nodes(mode: str, root: str, out: Path, caches: list[Path]) -> None:
    """Two torchrun agents on 127.0.0.1 (static rendezvous), one rank each, each with its own staging disk."""
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [
                TORCHRUN,
                "--nnodes=2",
                f"--node-rank={node}",
                "--nproc-per-node=1",
                "--master-addr=127.0.0.1",
                f"--master-port={port}",
                WORKER,
                mode,
                root,
                str(out),
            ],
            env=worker_env(SAVEPOINT_CACHE=str(caches[node])),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    for node, proc in enumerate(procs):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"node {node} {mode} exited {proc.returncode}\n{err[-6000:]}"


def reports(out: Path, mode: str) -> list[dict]:
    return [json.loads((out / f"{mode}-rank{r}.json").read_text()) for r in (0, 1)]


def objects(root: str, name: str) -> dict[str, int]:
    fs, path = fsspec.core.url_to_fs(root)
    fs.invalidate_cache()
    found = fs.find(f"{path}/{name}", detail=True)
    return {k[len(path) + len(name) + 2 :]: info["size"] for k, info in found.items()}


def owned_by(relpath: str, rank: int) -> bool:
    """Files only `rank` writes: its RNG state, its stateful state, its DCP shard file."""
    return (
        relpath.startswith(f"train_state/rng/rank-{rank:05d}.")
        or relpath.startswith(f"train_state/stateful/rank-{rank:05d}/")
        or relpath == f"train_state/dcp/__{rank}_0.distcp"
        or relpath == f"train_state/dcp_ranges/rank-{rank:05d}.json"  # the item checksums of that file
    )


def check_save(root: str, out: Path, caches: list[Path]) -> dict[str, int]:
    saved = reports(out, "save")
    for rank, report in enumerate(saved):
        assert report["listed_after_save"] == [2], f"rank {rank}'s save() returned before the commit"
        assert report["staging_left"] == [], f"rank {rank} left staged files"
        assert report["path"] == f"{root}/{STEP}"
    manifest = RemoteRoot(root).read_manifest(STEP)
    stored = objects(root, STEP)
    assert stored == {
        **{p: e.size for p, e in manifest.files.items()},
        "savepoint.json": stored["savepoint.json"],
    }
    # Rank 1's files exist only on its own disk: they are in the store because rank 1 uploaded them.
    rank1 = sum(size for rel, size in stored.items() if owned_by(rel, 1))
    assert rank1 > 0 and saved[1]["uploaded"] == rank1
    assert saved[0]["uploaded"] == sum(stored.values()) - rank1
    assert savepoint.verify(root) == [f"{root}/{STEP}"]
    for cache in caches:  # the staging dirs are empty once save() returned
        assert not [p for p in cache.rglob("*") if p.is_file()], f"files left in {cache}"
    return stored


def check_restore(out: Path, stored: dict[str, int]) -> None:
    restored = reports(out, "restore")
    saved = reports(out, "save")
    for rank, report in enumerate(restored):
        assert report["step"] == 2
        assert report["losses"] == saved[rank]["losses"], f"rank {rank} diverged after restore"
        other = 1 - rank
        # Nothing of the other rank's own state is downloaded; rank 0 needs no shard of rank 1 either
        # (DCP puts replicated tensors, AdamW's steps, into rank 0's file, which rank 1 does read).
        skipped = {
            rel
            for rel in stored
            if owned_by(rel, other)
            and not (other == 0 and rel.startswith(("train_state/dcp/", "train_state/dcp_ranges/")))
        }
        expected = sum(size for rel, size in stored.items() if rel not in skipped and rel != "savepoint.json")
        assert report["downloaded"] == expected, (rank, report["downloaded"], expected, sorted(skipped))
        assert skipped and report["downloaded"] < sum(stored.values())


def test_two_ranks_upload_their_own_files_and_restore_their_own_part(s3_root: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    run_one_node("save", s3_root, tmp_path, cache, "async")  # committed on every rank once wait() returns
    stored = check_save(s3_root, tmp_path, [cache])
    run_one_node("restore", s3_root, tmp_path, cache)
    check_restore(tmp_path, stored)

    # One process without torch.distributed restores the same objects (every file: it reads them all).
    model = tiny.tiny_llama(seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    with pytest.warns(UserWarning, match=r"saved by 2 rank\(s\) and is restored at 1"):
        assert savepoint.CheckpointManager(s3_root).restore(model=model, optimizer=opt).step == 2
    assert_same(
        load_file(tmp_path / "ref.safetensors"), plain_reference(model, opt), where="restored at 1 rank"
    )

    # A rank whose upload fails part-way: no manifest, and the objects every rank uploaded are gone.
    run_one_node("fail", s3_root, tmp_path, cache)
    failed = reports(tmp_path, "fail")
    assert "rank 1 could not upload" in failed[1]["error"] and "connection reset" in failed[1]["error"]
    assert "failed on 1 rank(s)" in failed[0]["error"] and "rank 1" in failed[0]["error"]
    assert [r["listed_after_failure"] for r in failed] == [[2], [2]]
    assert objects(s3_root, "step-00000003") == {}
    assert savepoint.verify(s3_root) == [f"{s3_root}/{STEP}"]

    # Damaged objects: each rank checks what it downloaded in the read that decodes it, and the ranks
    # vote before anything changes. Rank 1's DCP shard is read by rank 1 alone.
    fs, path = fsspec.core.url_to_fs(s3_root)
    shard = f"{path}/{STEP}/train_state/dcp/__1_0.distcp"
    raw = bytearray(fs.cat_file(shard))
    raw[len(raw) // 2] ^= 0xFF
    fs.pipe_file(shard, bytes(raw))
    run_one_node("damaged", s3_root, tmp_path, cache)
    damaged = reports(tmp_path, "damaged")
    assert "__1_0.distcp" in damaged[1]["error"], damaged[1]["error"]
    assert all(
        f"CorruptCheckpointError: checkpoint {s3_root}/{STEP} is damaged" in r["error"] for r in damaged
    )
    assert damaged[0]["unchanged"] is True


def test_two_nodes_without_a_shared_disk_save_and_resume_through_s3(s3_root: str, tmp_path: Path) -> None:
    caches = [tmp_path / "node0-disk", tmp_path / "node1-disk"]
    for cache in caches:
        cache.mkdir()
    run_two_nodes("save", s3_root, tmp_path, caches)
    stored = check_save(s3_root, tmp_path, caches)
    assert [r["cache"] for r in reports(tmp_path, "save")] == [str(c) for c in caches]
    run_two_nodes("restore", s3_root, tmp_path, caches)
    check_restore(tmp_path, stored)
