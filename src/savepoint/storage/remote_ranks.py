"""Collective saves to an object-store root: every rank uploads its own files, rank 0 the manifest last.

Nothing is shared but the store. Each rank stages on its own disk (`RemoteRoot.staging_dir`, under
$SAVEPOINT_CACHE: node-local is fine) and the commit runs as on a shared directory, with an upload
where the rename was:

    rank 0     deletes ROOT/step-N/ (an older save of that step, or a dead upload's objects);
               then every rank may write
    rank r     writes its files into its local dir, then `fs.put`s them under ROOT/step-N/ (s3fs:
               concurrent, multipart for large files), then sends its report (path, size, checksum)
               through the gather: a report is the rank's confirmation that its objects are up
    rank 0     checks one listing of ROOT/step-N/ against the reports, uploads savepoint.json LAST,
               and broadcasts the outcome: save() returns on every rank once the checkpoint lists
    failure    any rank's error reaches rank 0 in the gather: no manifest is uploaded and rank 0
               deletes the prefix. What a rank killed mid-upload leaves has no manifest either: it
               never lists, and the next writer's sweep removes it.

Rank 0 never reads another rank's bytes: its work is one listing (a few requests per 1,000 objects)
and the O(W) reports.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable

from savepoint.errors import SavepointError, StorageError
from savepoint.storage.local import MANIFEST_NAME, StagedDir
from savepoint.storage.remote import RemoteRoot

_TRAIN_STATE = (
    "train_state"  # where every rank writes (formats/train_state.py): a stray there is a new layout
)


class RemoteStagedDir(StagedDir):
    """This rank's local part of a save to `remote`: written here, uploaded by this rank.

    It offers what the collective commit calls on a shared staged dir (`take_reports`, `cover_rest`,
    `commit`, `abort`), plus `upload_own`, which every rank runs before it reports.
    """

    def __init__(self, remote: RemoteRoot, parent: str, final_name: str, *, rank: int) -> None:
        super().__init__(parent, final_name)
        self.remote, self.rank = remote, rank

    @property
    def url(self) -> str:
        return self.remote.step_url(self.final_name)

    def _object(self, relpath: str) -> str:
        return self.remote.object_key(self.final_name, relpath)

    # ------------------------------------------------------------ every rank

    def upload_own(self, error: BaseException | None) -> BaseException | None:
        """Upload this rank's files unless it already failed; return the error to report (its vote)."""
        if error is not None:
            return error
        try:
            self._cover_own()
            relpaths = sorted(self.entries)
            if relpaths:
                self.remote.fs.put([self.abspath(r) for r in relpaths], [self._object(r) for r in relpaths])
                self.remote.transfers["uploaded"] += sum(self.entries[r][0] for r in relpaths)
        except OSError as exc:
            return StorageError(
                f"rank {self.rank} could not upload its {len(self.entries)} file(s) to {self.url}: {exc}. "
                "Check the store's credentials, quota and network; nothing was committed."
            )
        except BaseException as exc:
            return exc
        return None

    def _cover_own(self) -> None:
        """Hash what a library wrote here without recording it; under train_state/ that is a layout we do not
        know (every rank writes there), which fails the save as on a shared directory."""
        strays = self.record_unlisted_outside(_TRAIN_STATE, ignore=frozenset())
        if strays:
            raise SavepointError(
                f"rank {self.rank} wrote {len(strays)} file(s) it did not record: {', '.join(sorted(strays)[:5])}. "
                "A library wrote files savepoint does not know about (a new torch or DeepSpeed layout?); "
                "nothing was committed. Please report this with your torch version."
            )

    def discard_local(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    # ------------------------------------------------------------ rank 0

    def take_reports(self, reports: list[dict[str, tuple[int, str]]]) -> None:
        """List every rank's files as reported, then check one listing of the prefix against them."""
        for other, entries in enumerate(reports):
            if other == 0:
                continue
            for relpath, entry in entries.items():
                if self.entries.setdefault(relpath, entry) != entry:
                    raise StorageError(
                        f"rank {other} and another rank both uploaded {relpath} to {self.url} with different "
                        "contents; nothing was committed."
                    )
        self._check_uploaded()

    def _check_uploaded(self) -> None:
        prefix = self._object("")
        self.remote.fs.invalidate_cache()
        try:
            listed = self.remote.fs.find(prefix.rstrip("/"), detail=True)
        except FileNotFoundError:
            listed = {}
        sizes = {
            key[len(prefix) :]: info.get("size") for key, info in listed.items() if key.startswith(prefix)
        }
        wrong = [
            f"{rel} ({'absent' if sizes.get(rel) is None else f'{sizes[rel]} bytes, reported {size}'})"
            for rel, (size, _) in sorted(self.entries.items())
            if sizes.get(rel) != size
        ]
        if wrong:
            raise StorageError(
                f"rank 0 does not find {len(wrong)} reported object(s) under {self.url}: {', '.join(wrong[:5])}. "
                "Every rank must use the same store (endpoint, bucket, credentials); nothing was committed."
            )

    def cover_rest(self) -> None:
        """Nothing left: every rank covered its own files before it uploaded them (`upload_own`)."""

    def commit(self, manifest_bytes: bytes, *, replace: bool = False) -> str:
        """Upload the manifest object, last: from now on the checkpoint lists. Returns its URL."""
        self.remote.fs.pipe_file(self._object(MANIFEST_NAME), manifest_bytes)
        self.remote.transfers["uploaded"] += len(manifest_bytes)
        self.discard_local()
        return self.url

    def abort(self) -> None:
        """Rank 0, after a failed save: delete the prefix (every live rank has stopped uploading: they all
        reported) and the local files. Never raises: it runs while another error propagates."""
        self.discard_local()
        try:
            self.remote.delete(self.final_name)
        except Exception as exc:
            warnings.warn(
                f"could not delete the objects of the failed save under {self.url} ({exc}); they hold no "
                "manifest, so they never list, and the next save sweeps them",
                stacklevel=2,
            )


def open_remote_staged(
    remote: RemoteRoot,
    parent: str,
    final_name: str,
    *,
    rank: int,
    vote: Callable[[BaseException | None], object],
) -> RemoteStagedDir:
    """Rank 0 clears ROOT/final_name/ of older objects; every rank opens its own local dir under `parent`.

    `vote` is the ranks' agreement (raising on every rank when one failed): it runs before anyone
    writes, so no upload can race the deletion. No rank needs to see another's files, so the
    root-sharing check of a shared directory does not apply."""
    error: BaseException | None = None
    staged = None
    if rank == 0:
        try:
            remote.delete(final_name)
        except BaseException as exc:
            error = exc
    if error is None:
        try:
            staged = RemoteStagedDir(remote, parent, final_name, rank=rank)
        except BaseException as exc:
            error = exc
    try:
        vote(error)
    except BaseException:
        if staged is not None:
            staged.discard_local()
        raise
    assert staged is not None  # the vote raised otherwise
    return staged
