"""The commit of a save, at any world size: O(W) small records on rank 0, none of the other ranks' bytes.

Every rank sends its vote and its (path, size, checksum) list to rank 0 (a gather). Rank 0 stats each
reported file (`take_reports`: proof it sees it, at the size reported), hashes only its own unlisted
files (`cover_rest`), writes the manifest, renames the temp dir into place, and broadcasts the outcome.
A file under train_state/ that no rank reported fails the save instead of being read by rank 0.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from contextlib import suppress
from typing import Any

from savepoint import distributed
from savepoint.distributed import DistributedSaveError, broadcast, rank
from savepoint.formats.train_state import TRAIN_STATE_DIR
from savepoint.pipeline.job import checkpoint_manifest
from savepoint.pipeline.staging import ROOT_CHECK_NAME, SharedStagedDir
from savepoint.storage.local import fsync_dir, storage_error
from savepoint.storage.remote_ranks import RemoteStagedDir


def take_reports(staged: SharedStagedDir, reports: list[dict[str, tuple[int, str]]]) -> None:
    """Rank 0 lists every other rank's files as reported: it stats them (`check_reported`), never
    reads them. Two ranks reporting one path with different contents is refused."""
    staged.others_files = frozenset(rel for other, entries in enumerate(reports) if other for rel in entries)
    for other, entries in enumerate(reports):
        if other == 0:
            continue
        check_reported(staged, other, entries)
        for relpath, entry in entries.items():
            if staged.entries.setdefault(relpath, entry) != entry:
                raise DistributedSaveError(
                    f"rank {other} and another rank both wrote {relpath} in {staged.path} with different "
                    "contents; nothing was committed.",
                    failed={other: f"wrote {relpath}, which another rank also wrote"},
                )


def cover_rest(staged: SharedStagedDir) -> None:
    """One walk, names only: rank 0 hashes its own unlisted files (outside train_state/, where no other
    rank writes); a file under train_state/ that no rank reported fails the save."""
    strays = staged.record_unlisted_outside(TRAIN_STATE_DIR, ignore=frozenset({ROOT_CHECK_NAME}))
    if strays:
        raise DistributedSaveError(
            f"{len(strays)} file(s) in {staged.path} were reported by no rank: {', '.join(sorted(strays)[:5])}. "
            "A library wrote files savepoint does not know about (a new torch or DeepSpeed layout?); "
            "nothing was committed. Please report this with your torch version.",
        )


def sync_own_dirs(staged: SharedStagedDir) -> None:
    """Make this rank's new directory entries durable before it reports them (the writer syncs its own
    writes, which a network filesystem needs too); rank 0 then skips the directories only others wrote."""
    for path in sorted({os.path.dirname(staged.abspath(rel)) for rel in staged.entries}):
        try:
            fsync_dir(path)
        except OSError as exc:
            raise storage_error(exc, path, "syncing") from exc


def check_reported(staged: SharedStagedDir, other: int, entries: Mapping[str, tuple[int, str]]) -> None:
    """Rank 0 lists another rank's file only once it sees it, at the size reported (a stat, no read)."""
    missing = []
    for relpath, (size, _) in entries.items():
        try:
            seen = os.stat(staged.abspath(relpath)).st_size
        except OSError:
            seen = None
        if seen != size:
            missing.append(f"{relpath} ({'absent' if seen is None else f'{seen} bytes, reported {size}'})")
    if missing:
        raise DistributedSaveError(
            f"rank 0 does not see {len(missing)} file(s) rank {other} wrote into {staged.path}: "
            f"{', '.join(missing[:5])}. The root is not shared by every rank; use a shared filesystem or an "
            "object-store root (s3://...). Nothing was committed.",
            failed={other: "its files are not visible to rank 0"},
        )


def commit(
    staged: SharedStagedDir | RemoteStagedDir,
    error: BaseException | None,
    request: Any,
    kind: str,
    base_model: dict[str, Any] | None,
    *,
    timeout: float | None,
    what: str,
) -> str:
    """Every rank sends its vote and its (path, size, checksum) list to rank 0 (a gather); rank 0 writes
    the manifest over them without reading another rank's bytes, renames, and tells every rank."""
    final, reports = None, None
    failure: BaseException | None = None
    if isinstance(staged, RemoteStagedDir):  # each rank's report confirms its objects are uploaded
        error = staged.upload_own(error)
    elif error is None and rank() != 0:
        try:
            sync_own_dirs(staged)
        except BaseException as exc:
            error = exc
    try:
        reports = distributed.gather_to_rank0(error, dict(staged.entries), timeout=timeout, what=what)
    except DistributedSaveError as exc:
        if rank() != 0:
            raise  # lost contact with rank 0: nobody is left to tell us the outcome
        failure = exc
    except BaseException as exc:
        failure = exc
    if rank() != 0:
        failure = error  # raised after the broadcast, which rank 0 is waiting to send
    if rank() == 0 and failure is None and reports is not None:
        try:
            with suppress(FileNotFoundError):
                os.remove(staged.abspath(ROOT_CHECK_NAME))
            if isinstance(staged, RemoteStagedDir):  # the store lists what every rank uploaded
                staged.take_reports(reports)
                staged.cover_rest()
            else:
                take_reports(staged, reports)
                cover_rest(staged)
            manifest = checkpoint_manifest(request, kind, staged.entries, base_model)
            final = staged.commit(manifest.to_json(), replace=True)
        except BaseException as exc:
            failure = exc
    outcome = None
    if rank() == 0 and failure is not None:
        failed = failure.failed if isinstance(failure, DistributedSaveError) else {0: ""}
        message = (
            str(failure) if isinstance(failure, DistributedSaveError) else distributed.describe_error(failure)
        )
        outcome = (message, failed)
    try:
        final_seen, outcome = broadcast((final, outcome), timeout=timeout, what=what)
    except DistributedSaveError:
        if final is not None:  # committed: the checkpoint is whole even if a peer vanished since its vote
            warnings.warn(f"{what}: committed, but another rank stopped answering afterwards", stacklevel=3)
            return final
        if failure is not None:
            raise failure from None
        raise
    if failure is not None:
        raise failure  # rank 0's own error, or a peer's, or this rank's own
    if outcome is not None:
        message, failed = outcome
        if failed.get(0) == "":
            message = f"{what} failed on rank 0, nothing was committed: {message}"
            failed = {0: message}
        raise DistributedSaveError(message, failed=failed)
    return final_seen
