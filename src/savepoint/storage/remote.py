"""Checkpoint roots on object stores and other fsspec URLs (`s3://bucket/run`, `memory://run`, ...).

There is no rename on an object store, so the manifest object is the commit:

    ROOT/step-00000042/model.safetensors ...     uploading: no manifest, so it does not list
    ROOT/step-00000042/savepoint.json            uploaded last: from now on the checkpoint lists
    ROOT/step-00000042/model.safetensors ...     deleting: the manifest goes first, so it stops
                                                 listing at once; the rest follows

A save is written and committed in a local staging directory by the ordinary local code, then
uploaded (on the background thread when the manager is async). Restoring downloads the files the
manifest lists into a local temporary directory, where the ordinary local code checksums and loads
them. A prefix without a manifest (an upload that was interrupted) is never listed, and the writer
sweeps it when it next opens the root.

One writer per root: object stores have no advisory locks, so nothing stops two writers here
(locally a second writer is refused). Give every run its own root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

from savepoint.discovery import STEP_DIR, info_from_manifest
from savepoint.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    Problem,
    SavepointError,
)
from savepoint.manifest import MAX_MANIFEST_BYTES, Manifest, find_problems, parse_manifest
from savepoint.policy import CheckpointInfo
from savepoint.storage.local import MANIFEST_NAME

CACHE_ENV = "SAVEPOINT_CACHE"
_FETCH_CHUNK = 16 * 1024 * 1024
# Staging dirs of this process -> the root they upload to, so that a collective save given a staging
# dir (`storage/remote_ranks.py`) knows its files go to an object store, not to a shared directory.
_STAGED_FOR: weakref.WeakValueDictionary[str, RemoteRoot] = weakref.WeakValueDictionary()


def is_remote_url(root: str | os.PathLike[str]) -> bool:
    """True for fsspec URLs other than plain local paths and `file://`."""
    root = os.fspath(root)
    return "://" in root and not root.startswith("file://")


def cache_dir() -> str:
    """Where remote checkpoints are staged and downloaded: `$SAVEPOINT_CACHE`, else the system temp dir."""
    return os.environ.get(CACHE_ENV) or tempfile.gettempdir()


class RemoteRoot:
    """The checkpoints of one run under an fsspec URL.

    >>> root = RemoteRoot("s3://bucket/run")            # doctest: +SKIP
    >>> root.upload_checkpoint("/tmp/stage/step-00000010")
    >>> [i.step for i in root.list_checkpoints()]
    [10]
    """

    def __init__(self, url: str, **storage_options: Any) -> None:
        import fsspec

        self.url = url.rstrip("/")
        self.fs, self.path = fsspec.core.url_to_fs(self.url, **storage_options)
        self.path = self.path.rstrip("/")
        self._staging: str | None = None
        self.transfers = {"uploaded": 0, "downloaded": 0}  # bytes this process moved, for reports and tests

    # ------------------------------------------------------------ names

    def step_url(self, name: str) -> str:
        return f"{self.url}/{name}"

    def _key(self, *parts: str) -> str:
        return "/".join((self.path, *parts))

    def object_key(self, *parts: str) -> str:
        """The store's key (no protocol) of `parts` below the root: `object_key("step-00000042", "a.json")`."""
        return self._key(*parts)

    @property
    def staging_dir(self) -> str:
        """A local directory of this process where saves are written and committed before upload."""
        if self._staging is None:
            os.makedirs(cache_dir(), exist_ok=True)
            self._staging = tempfile.mkdtemp(prefix="savepoint-stage-", dir=cache_dir())
            weakref.finalize(self, shutil.rmtree, self._staging, True)
            _STAGED_FOR[self._staging] = self
        return self._staging

    def clear_staging(self) -> None:
        """Remove whatever a save left in the staging dir (uploaded, or given up); the dir itself stays."""
        if self._staging is None:
            return
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self._staging):
                shutil.rmtree(os.path.join(self._staging, name), ignore_errors=True)

    # ------------------------------------------------------------ listing

    def _step_names(self) -> list[str]:
        self.fs.invalidate_cache()  # s3fs caches listings; a stale one could hide a commit or a delete
        try:
            entries = self.fs.ls(self.path, detail=False)
        except FileNotFoundError:
            return []
        names = {e.rstrip("/").rsplit("/", 1)[-1] for e in entries}
        return sorted(n for n in names if STEP_DIR.match(n))

    def read_manifest(self, name: str) -> Manifest:
        """Fetch and parse one checkpoint's manifest; CorruptCheckpointError when it is absent or bad."""
        return parse_manifest(self.manifest_bytes(name), self.step_url(name))

    def manifest_bytes(self, name: str) -> bytes:
        key = self._key(name, MANIFEST_NAME)
        try:
            size = self.fs.size(key)
            if size is not None and size > MAX_MANIFEST_BYTES:
                raise CorruptCheckpointError(
                    self.step_url(name), [Problem(MANIFEST_NAME, f"is {size} bytes")]
                )
            # One byte past the cap at most, whatever the object became since its size was listed.
            raw = bytes(self.fs.cat_file(key, start=0, end=MAX_MANIFEST_BYTES + 1))
        except FileNotFoundError as exc:
            raise CorruptCheckpointError(
                self.step_url(name), [Problem(MANIFEST_NAME, "missing: not a committed checkpoint")]
            ) from exc
        if len(raw) > MAX_MANIFEST_BYTES:
            raise CorruptCheckpointError(
                self.step_url(name),
                [Problem(MANIFEST_NAME, f"grew past {MAX_MANIFEST_BYTES} bytes while read")],
            )
        return raw

    def list_checkpoints(self, *, warn: bool = True) -> list[CheckpointInfo]:
        """Committed checkpoints (prefixes holding a manifest that parses), oldest step first."""
        infos = []
        for name in self._step_names():
            if not self.fs.exists(self._key(name, MANIFEST_NAME)):
                continue  # an upload in progress or interrupted: not a checkpoint
            try:
                manifest = self.read_manifest(name)
            except SavepointError as exc:  # one bad manifest spoils one checkpoint, never the listing
                if warn:
                    warnings.warn(f"skipping {self.step_url(name)}: {exc}", stacklevel=2)
                continue
            if manifest.step != int(STEP_DIR.match(name).group(1)):  # type: ignore[union-attr]
                continue
            infos.append(info_from_manifest(self.step_url(name), manifest))
        return sorted(infos, key=lambda i: i.step)

    # ------------------------------------------------------------ writing

    def upload_checkpoint(self, local_dir: str) -> str:
        """Upload a committed local checkpoint: every file, then the manifest object last. Returns its URL.

        Anything already under that prefix (an older checkpoint of the same step, or what an
        interrupted upload left) is deleted first, manifest first, so no mix of old and new ever lists.
        """
        name = os.path.basename(os.path.normpath(local_dir))
        self.delete(name)
        files = []
        for dirpath, _dirs, names in os.walk(local_dir):
            for fname in names:
                rel = os.path.relpath(os.path.join(dirpath, fname), local_dir).replace(os.sep, "/")
                if rel != MANIFEST_NAME:
                    files.append(rel)
        for rel in sorted(files):
            self._put(os.path.join(local_dir, rel), self._key(name, rel))
        self._put(os.path.join(local_dir, MANIFEST_NAME), self._key(name, MANIFEST_NAME))  # the commit
        return self.step_url(name)

    def _put(self, local: str, key: str) -> None:
        # One object at a time, in order: the manifest must not race ahead of the files it lists.
        self.fs.put_file(local, key)
        self.transfers["uploaded"] += os.path.getsize(local)

    def delete(self, name_or_url: str) -> None:
        """Delete one checkpoint: its manifest first (it stops listing at once), then everything else."""
        name = name_or_url.rstrip("/").rsplit("/", 1)[-1]
        prefix = self._key(name)
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._key(name, MANIFEST_NAME))
        self.fs.invalidate_cache()
        with contextlib.suppress(FileNotFoundError):
            if self.fs.exists(prefix):
                self.fs.rm(prefix, recursive=True)

    def sweep(self) -> list[str]:
        """Delete the prefixes interrupted uploads left (no manifest). Only the root's one writer may call this."""
        removed = []
        for name in self._step_names():
            if not self.fs.exists(self._key(name, MANIFEST_NAME)):
                self.delete(name)
                removed.append(name)
        return removed

    # ------------------------------------------------------------ reading

    def name_of(self, step_url: str) -> str:
        name = step_url.rstrip("/").rsplit("/", 1)[-1]
        if not STEP_DIR.match(name) or self.step_url(name) != step_url.rstrip("/"):
            raise CheckpointNotFoundError(f"{step_url} is not a checkpoint of {self.url}")
        return name

    def download(self, step_url: str, dest: str) -> str:
        """Download a checkpoint's manifest and the files it lists (only those) into `dest`/NAME.

        Files are not checked here: the caller checksums the local copy (`find_problems`), so a
        damaged or missing object is reported by name exactly as on local disk.
        """
        name = self.name_of(step_url)
        raw = self.manifest_bytes(name)
        manifest = parse_manifest(raw, step_url)  # refuses paths that climb out of the checkpoint
        local = os.path.join(dest, name)
        self.fetch(name, manifest, sorted(manifest.files), local)
        with open(os.path.join(local, MANIFEST_NAME), "wb") as f:
            f.write(raw)  # the very bytes the files were fetched by
        return local

    def fetch(self, name: str, manifest: Manifest, relpaths: list[str], local: str) -> None:
        """Download these files of checkpoint `name` (listed in its parsed `manifest`) into `local`.

        One listing gives every object's size; the objects of the listed size come down in one
        concurrent `fs.get`. A file that cannot be placed (a listed "a" and "a/b") or is absent is
        left out, for the caller's check to report "missing"; one whose size is not the listed one is
        fetched only to one byte past it, so disk and time follow the manifest's claim, never an
        object's real size.
        """
        os.makedirs(local, exist_ok=True)
        prefix = self._key(name) + "/"
        self.fs.invalidate_cache()
        try:
            listed = self.fs.find(self._key(name), detail=True)
        except FileNotFoundError:
            listed = {}
        sizes = {k[len(prefix) :]: info.get("size") for k, info in listed.items() if k.startswith(prefix)}
        whole: list[str] = []
        capped: list[str] = []
        for rel in relpaths:
            target = os.path.join(local, rel)
            if rel not in sizes:
                continue
            try:
                os.makedirs(os.path.dirname(target), exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                continue
            if os.path.isdir(target):
                continue
            (whole if sizes[rel] == manifest.files[rel].size else capped).append(rel)
        whole = [r for r in whole if not os.path.isdir(os.path.join(local, r))]  # "a" and "a/b" both listed
        try:
            self.fs.get([self._key(name, r) for r in whole], [os.path.join(local, r) for r in whole])
        except OSError:  # one object gone since the listing: the others one by one, the gone one "missing"
            for rel in whole:
                with contextlib.suppress(OSError):
                    self.fs.get_file(self._key(name, rel), os.path.join(local, rel))
        self.transfers["downloaded"] += sum(
            manifest.files[r].size for r in whole if os.path.isfile(os.path.join(local, r))
        )
        for rel in capped:
            with contextlib.suppress(FileNotFoundError, NotADirectoryError, IsADirectoryError):
                self._fetch_capped(self._key(name, rel), os.path.join(local, rel), manifest.files[rel].size)

    def _fetch_capped(self, key: str, target: str, size: int) -> None:
        remaining = size + 1
        with self.fs.open(key, "rb") as src, open(target, "wb") as dst:
            while remaining > 0 and (chunk := src.read(min(remaining, _FETCH_CHUNK))):
                dst.write(chunk)
                remaining -= len(chunk)
                self.transfers["downloaded"] += len(chunk)

    @contextlib.contextmanager
    def local_copy(self, step_url: str) -> Iterator[str]:
        """Download a checkpoint into a fresh temporary directory, yield its path, then remove it."""
        os.makedirs(cache_dir(), exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="savepoint-fetch-", dir=cache_dir()) as tmp:
            yield self.download(step_url, tmp)

    def unlisted(self, name: str, manifest: Manifest) -> list[Problem]:
        """Objects under a checkpoint's prefix that its manifest does not list."""
        prefix = self._key(name) + "/"
        self.fs.invalidate_cache()
        keys = self.fs.find(self._key(name))
        rels = sorted(k[len(prefix) :] for k in keys if k.startswith(prefix))
        return [
            Problem(rel, "present but not listed in the manifest (planted or left over)")
            for rel in rels
            if rel != MANIFEST_NAME and rel not in manifest.files
        ]


# Local copies holding only one rank's part of a checkpoint -> the listed files left in the store, so that
# a reader verifying "every DCP file" skips those (this rank reads none of them). In-process only: nothing
# on disk can claim a file need not be checked.
_LEFT_IN_STORE: dict[str, frozenset[str]] = {}


def left_in_store(local_copy: str) -> frozenset[str]:
    """Files of the partial local copy `local_copy` that were deliberately not downloaded (else empty)."""
    return _LEFT_IN_STORE.get(os.path.abspath(local_copy), frozenset())


@contextlib.contextmanager
def partial_copy(local_copy: str, left: frozenset[str]) -> Iterator[None]:
    """Mark `local_copy` as holding all its manifest lists but `left`, for the `with` block."""
    key = os.path.abspath(local_copy)
    _LEFT_IN_STORE[key] = left
    try:
        yield
    finally:
        _LEFT_IN_STORE.pop(key, None)


def staged_for(staging_dir: str) -> RemoteRoot | None:
    """The root whose saves `staging_dir` stages (a `RemoteRoot.staging_dir` of this process), else None."""
    return _STAGED_FOR.get(staging_dir)


def verify_remote(url: str) -> list[str]:
    """`savepoint.verify` for an fsspec URL: one checkpoint, or every committed checkpoint under a root.

    Prefixes without a manifest are uploads in progress (or interrupted ones), not damaged
    checkpoints, so they are not verified.
    """
    url = url.rstrip("/")
    parent, _, last = url.rpartition("/")
    if STEP_DIR.match(last) and RemoteRoot(parent).fs.exists(RemoteRoot(parent)._key(last, MANIFEST_NAME)):
        root, names = RemoteRoot(parent), [last]
    else:
        root = RemoteRoot(url)
        names = [i.path.rsplit("/", 1)[-1] for i in root.list_checkpoints()]
        if not names:
            raise CheckpointNotFoundError(
                f"no committed checkpoint under {url} (no step-N/savepoint.json object)"
            )
    problems: list[Problem] = []
    for name in names:
        prefix = "" if len(names) == 1 and root.step_url(name) == url else name + "/"
        try:
            manifest = root.read_manifest(name)
        except CorruptCheckpointError as exc:
            problems += [Problem(prefix + p.path, p.reason) for p in exc.problems]
            continue
        with root.local_copy(root.step_url(name)) as local:
            found = find_problems(local, check_unlisted=False) + root.unlisted(name, manifest)
        problems += [Problem(prefix + p.path, p.reason) for p in found]
    if problems:
        raise CorruptCheckpointError(
            url, problems, hint="restore an earlier checkpoint or delete the damaged one"
        )
    return [root.step_url(n) for n in names]
