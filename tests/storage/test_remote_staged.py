"""One rank's part of a collective save to an object store, and which files a rank downloads, in-process
on `memory://` (the torchrun runs against S3 are in test_remote_ranks.py)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from savepoint.errors import SavepointError, StorageError
from savepoint.manifest import build_manifest
from savepoint.storage.remote import RemoteRoot, staged_for
from savepoint.storage.remote_ranks import RemoteStagedDir, open_remote_staged
from savepoint.storage.remote_restore import reads_outside_dcp

NAME = "step-00000007"


@pytest.fixture
def remote() -> Iterator[RemoteRoot]:
    root = RemoteRoot(f"memory://savepoint-ranks-{uuid.uuid4().hex[:8]}")
    yield root
    if root.fs.exists(root.path):
        root.fs.rm(root.path, recursive=True)


def staged(remote: RemoteRoot, rank: int, files: dict[str, bytes]) -> RemoteStagedDir:
    part = RemoteStagedDir(remote, remote.staging_dir, NAME, rank=rank)
    for rel, data in files.items():
        part.write_bytes(rel, data)
    return part


def keys(remote: RemoteRoot) -> list[str]:
    remote.fs.invalidate_cache()
    prefix = remote.object_key(NAME) + "/"
    return sorted(k[len(prefix) :] for k in remote.fs.find(remote.object_key(NAME)))


def test_each_rank_uploads_its_files_and_the_manifest_goes_last(remote: RemoteRoot) -> None:
    assert staged_for(remote.staging_dir) is remote
    rank0 = staged(remote, 0, {"config.json": b"{}", "train_state/rng/rank-00000.json": b"0"})
    rank1 = staged(remote, 1, {"train_state/rng/rank-00001.json": b"11"})
    assert rank1.upload_own(None) is None and rank0.upload_own(None) is None
    assert keys(remote) == [
        "config.json",
        "train_state/rng/rank-00000.json",
        "train_state/rng/rank-00001.json",
    ]
    assert remote.list_checkpoints() == []  # no manifest yet: not a checkpoint
    rank0.take_reports([dict(rank0.entries), dict(rank1.entries)])
    url = rank0.commit(build_manifest("module", rank0.entries, step=7).to_json())
    assert url == remote.step_url(NAME) and [i.step for i in remote.list_checkpoints()] == [7]
    assert set(remote.read_manifest(NAME).files) == set(keys(remote)) - {"savepoint.json"}
    assert not os.path.exists(rank0.path)  # nothing of the save is left on the staging disk


def test_a_report_without_its_object_commits_nothing(remote: RemoteRoot) -> None:
    rank0 = staged(remote, 0, {"config.json": b"{}"})
    assert rank0.upload_own(None) is None
    never_uploaded = {"train_state/rng/rank-00001.json": (2, "0" * 32)}
    with pytest.raises(StorageError, match=r"does not find 1 reported object.*rank-00001\.json \(absent\)"):
        rank0.take_reports([dict(rank0.entries), never_uploaded])
    rank0.abort()
    assert keys(remote) == []


def test_two_ranks_reporting_one_path_with_different_contents_is_refused(remote: RemoteRoot) -> None:
    rank0 = staged(remote, 0, {"metrics.json": b"{}"})
    with pytest.raises(StorageError, match=r"rank 1 and another rank both uploaded metrics\.json"):
        rank0.take_reports([dict(rank0.entries), {"metrics.json": (3, "f" * 32)}])


def test_a_failed_rank_uploads_nothing_and_an_unknown_file_fails_the_save(remote: RemoteRoot) -> None:
    part = staged(remote, 1, {"train_state/rng/rank-00001.json": b"1"})
    earlier = RuntimeError("capture failed")
    assert part.upload_own(earlier) is earlier
    os.makedirs(part.abspath("train_state/dcp"))
    with open(part.abspath("train_state/dcp/__9_0.distcp"), "wb") as f:  # written, never recorded
        f.write(b"x")
    error = part.upload_own(None)
    assert isinstance(error, SavepointError) and "__9_0.distcp" in str(error)
    assert keys(remote) == []


def test_opening_a_save_clears_the_prefix_before_any_rank_writes(remote: RemoteRoot) -> None:
    remote.fs.pipe_file(remote.object_key(NAME, "left-by-a-dead-upload.bin"), b"x")
    votes = []
    part = open_remote_staged(remote, remote.staging_dir, NAME, rank=0, vote=votes.append)
    assert votes == [None] and keys(remote) == [] and os.path.isdir(part.path)
    with pytest.raises(RuntimeError, match="peer failed"):

        def refuse(error: BaseException | None) -> None:
            raise RuntimeError("peer failed")

        open_remote_staged(remote, remote.staging_dir, "step-00000008", rank=1, vote=refuse)
    assert sorted(os.listdir(remote.staging_dir)) == [os.path.basename(part.path)]  # the refused one is gone


@pytest.mark.parametrize(
    ("relpath", "rank", "reads"),
    [
        ("model.safetensors", 3, True),
        ("train_state/scheduler.json", 3, True),
        ("train_state/dcp/.metadata", 3, True),
        ("train_state/dcp/__3_0.distcp", 3, False),  # data files: decided by DCP's load plan
        ("train_state/rng/rank-00003.json", 3, True),
        ("train_state/rng/rank-00002.safetensors", 3, False),
        ("train_state/stateful/rank-00003/data.json", 3, True),
        ("train_state/stateful/rank-00001/data.json", 3, False),
        ("train_state/stateful/rank-00000/data.json", 3, False),  # rank 3 has its own
        ("train_state/stateful/rank-00000/data.json", 5, True),  # rank 5 has none: rank 0's, as restore does
    ],
)
def test_which_files_a_rank_downloads(relpath: str, rank: int, reads: bool) -> None:
    files = {
        p: (1, "0" * 32)
        for p in [
            "model.safetensors",
            *[f"train_state/rng/rank-{r:05d}.json" for r in range(4)],
            *[f"train_state/stateful/rank-{r:05d}/data.json" for r in range(4)],
        ]
    }
    manifest = build_manifest("model", files, step=1)
    assert reads_outside_dcp(manifest, relpath, rank) is reads
