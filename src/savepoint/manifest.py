"""The manifest (`savepoint.json`): written last, it is what makes a directory a checkpoint.

It records the format version, the step, wall time, metrics, library versions, the parent
checkpoint, and for every file its relative path, size and xxh3-128 checksum. Readers trust nothing
in a checkpoint before the manifest vouches for it.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from typing import Any

from savepoint._hashing import CHECKSUM_ALGORITHM, hash_file
from savepoint.errors import (
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    Problem,
    UnsafeCheckpointError,
)
from savepoint.storage.local import MANIFEST_NAME

FORMAT_NAME = "savepoint"
FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 64 * 1024 * 1024  # far above any real manifest; refuses absurd files unread
# "sharded": weights only in train_state/dcp/ (a torchrun save with sharded_model=True); `savepoint consolidate`
# turns it into a model directory.
KINDS = ("model", "module", "adapter", "export", "sharded")
_VERSIONED = ("savepoint", "torch", "safetensors", "transformers", "peft", "accelerate")


@dataclass(frozen=True)
class FileEntry:
    size: int
    checksum: str


@dataclass
class Manifest:
    kind: str
    files: dict[str, FileEntry]
    step: int | None = None
    created: float = field(default_factory=time.time)
    metrics: dict[str, float] = field(default_factory=dict)
    parent: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    base_model: dict[str, Any] | None = None
    world_size: int = 1
    format_version: int = FORMAT_VERSION

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "kind": self.kind,
            "step": self.step,
            "created": self.created,
            "metrics": self.metrics,
            "parent": self.parent,
            "world_size": self.world_size,
            "base_model": self.base_model,
            "versions": self.versions,
            "checksum_algorithm": CHECKSUM_ALGORITHM,
            "files": {p: {"size": e.size, "checksum": e.checksum} for p, e in sorted(self.files.items())},
        }
        return json.dumps(doc, indent=1, allow_nan=False).encode()

    @property
    def total_size(self) -> int:
        return sum(e.size for e in self.files.values())


@functools.cache
def _installed_versions() -> tuple[tuple[str, str], ...]:
    # importlib.metadata scans site-packages each call (~35 ms); versions do not change in a process.
    out = []
    for name in _VERSIONED:
        try:
            out.append((name, importlib_metadata.version(name)))
        except importlib_metadata.PackageNotFoundError:
            continue
    return tuple(out)


def library_versions() -> dict[str, str]:
    return dict(_installed_versions())


def clean_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """Metrics as plain finite floats (tensors and numpy scalars accepted); NaN/Inf are refused."""
    out: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        try:
            number = float(value.item() if hasattr(value, "item") else value)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}") from exc
        if not math.isfinite(number):
            raise ValueError(f"metric {key!r} is {number}; only finite values can rank checkpoints")
        out[str(key)] = number
    return out


def build_manifest(kind: str, entries: Mapping[str, tuple[int, str]], **fields: Any) -> Manifest:
    """A manifest for files recorded by a StagedDir (`entries`: relpath -> (size, checksum))."""
    files = {p: FileEntry(size, digest) for p, (size, digest) in entries.items() if p != MANIFEST_NAME}
    return Manifest(kind=kind, files=files, versions=library_versions(), **fields)


# ---------------------------------------------------------------- reading


def _fail(ckpt: str, reason: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(ckpt, [Problem(MANIFEST_NAME, reason)])


def _expect(
    doc: Mapping[str, Any], key: str, types: tuple[type, ...], ckpt: str, *, optional: bool = False
) -> Any:
    value = doc.get(key)
    if value is None and optional:
        return None
    # bool is an int in Python; a manifest's numbers are never booleans.
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise _fail(
            ckpt, f"field {key!r} should be {'/'.join(t.__name__ for t in types)}, found {value!r:.80}"
        )
    return value


class _DuplicateKeyError(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object hook refusing repeated keys: parsers disagree on which one wins, so a manifest
    with two `format_version`s (or two entries for one file) could mean different things to different
    readers (tests/reliability: hostile inputs)."""
    doc = dict(pairs)
    if len(doc) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise _DuplicateKeyError(f"duplicate key {dup!r:.80}")
    return doc


def parse_manifest(raw: bytes, ckpt: str) -> Manifest:
    """Parse and validate manifest bytes; any malformation is a CorruptCheckpointError."""
    try:
        doc = json.loads(raw, object_pairs_hook=_no_duplicates)
    # ValueError also covers what json raises besides JSONDecodeError: an integer literal longer than
    # Python's 4300-digit limit (found by tests/reliability/test_fuzz_readers.py).
    except (ValueError, RecursionError) as exc:
        raise _fail(ckpt, f"not valid JSON ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise _fail(ckpt, "not a savepoint manifest (missing 'format': 'savepoint')")
    version = _expect(doc, "format_version", (int,), ckpt)
    if version > FORMAT_VERSION:
        raise IncompatibleCheckpointError(
            f"{ckpt} was written in savepoint format version {version}, newer than the {FORMAT_VERSION} this "
            "savepoint reads; upgrade savepoint to read it"
        )
    if version < 1:
        raise _fail(ckpt, f"format_version {version} is not a valid version")
    kind = _expect(doc, "kind", (str,), ckpt)
    if kind not in KINDS:
        raise _fail(ckpt, f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    files_doc = _expect(doc, "files", (dict,), ckpt)
    files = {}
    for path, entry in files_doc.items():
        if not isinstance(entry, dict):
            raise _fail(ckpt, f"entry for {path!r} is not an object")
        size, digest = entry.get("size"), entry.get("checksum")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise _fail(ckpt, f"entry for {path!r} has an invalid size {size!r:.40}")
        if (
            not isinstance(digest, str)
            or len(digest) != 32
            or any(c not in "0123456789abcdef" for c in digest)
        ):
            raise _fail(ckpt, f"entry for {path!r} has an invalid checksum {digest!r:.40}")
        check_relpath(path, ckpt)
        files[path] = FileEntry(size, digest)
    metrics = _expect(doc, "metrics", (dict,), ckpt, optional=True) or {}
    for key, value in metrics.items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise _fail(ckpt, f"metric {key!r} is not a number")
    step = _expect(doc, "step", (int,), ckpt, optional=True)
    if step is not None and step < 0:
        raise _fail(ckpt, f"step {step} is negative")
    base = _expect(doc, "base_model", (dict,), ckpt, optional=True)
    versions = _expect(doc, "versions", (dict,), ckpt, optional=True) or {}
    return Manifest(
        kind=kind,
        files=files,
        step=step,
        created=float(_expect(doc, "created", (int, float), ckpt)),
        metrics={str(k): float(v) for k, v in metrics.items()},
        parent=_expect(doc, "parent", (str,), ckpt, optional=True),
        versions={str(k): str(v) for k, v in versions.items()},
        base_model=base,
        world_size=_expect(doc, "world_size", (int,), ckpt, optional=True) or 1,
        format_version=version,
    )


def read_manifest(ckpt_dir: str) -> Manifest:
    """Read `ckpt_dir/savepoint.json`; CorruptCheckpointError if it is missing or malformed."""
    path = os.path.join(ckpt_dir, MANIFEST_NAME)
    try:
        if os.path.islink(path):
            raise UnsafeCheckpointError(ckpt_dir, [Problem(MANIFEST_NAME, "is a symbolic link")])
        if os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path):
            # A FIFO or device would block `open` forever (tests/reliability: hostile inputs).
            raise _fail(ckpt_dir, "is not a regular file (a FIFO or device?)")
        size = os.path.getsize(path)
        if size > MAX_MANIFEST_BYTES:
            raise _fail(ckpt_dir, f"is {size} bytes, larger than any manifest savepoint writes")
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError as exc:
        raise _fail(ckpt_dir, "missing: this directory is not a committed savepoint checkpoint") from exc
    except IsADirectoryError as exc:
        raise _fail(ckpt_dir, "is a directory, not a file") from exc
    except NotADirectoryError as exc:
        raise _fail(ckpt_dir, "the checkpoint path is a file, not a directory") from exc
    except OSError as exc:
        raise _fail(ckpt_dir, f"unreadable ({exc.strerror or exc})") from exc
    return parse_manifest(raw, ckpt_dir)


def check_relpath(relpath: str, ckpt: str) -> None:
    """Refuse paths that could leave the checkpoint directory."""
    parts = relpath.replace("\\", "/").split("/")
    if not relpath or relpath.startswith(("/", "\\")) or (len(relpath) > 1 and relpath[1] == ":"):
        raise UnsafeCheckpointError(
            ckpt, [Problem(relpath, "absolute path; files must lie inside the checkpoint")]
        )
    if any(p in ("..", "") for p in parts) or "\x00" in relpath:
        raise UnsafeCheckpointError(ckpt, [Problem(relpath, "path climbs out of the checkpoint directory")])


def resolve_inside(ckpt_dir: str, relpath: str) -> str:
    """The absolute path of `relpath`, refusing anything (`..`, absolute, symlinks) that leaves `ckpt_dir`."""
    check_relpath(relpath, ckpt_dir)
    root = os.path.realpath(ckpt_dir)
    full = os.path.realpath(os.path.join(root, relpath))
    if os.path.commonpath([root, full]) != root:
        raise UnsafeCheckpointError(
            ckpt_dir, [Problem(relpath, "resolves (through a symlink) outside the checkpoint")]
        )
    return full


def find_problems(
    ckpt_dir: str, manifest: Manifest | None = None, *, check_unlisted: bool = True
) -> list[Problem]:
    """Every damaged, missing, unlisted or unsafe file of a checkpoint (empty when it is intact)."""
    if manifest is None:
        try:
            manifest = read_manifest(ckpt_dir)
        except CorruptCheckpointError as exc:
            return exc.problems
    problems = []
    for relpath, entry in sorted(manifest.files.items()):
        problem = check_file(ckpt_dir, relpath, entry)
        if problem:
            problems.append(problem)
    if check_unlisted:
        problems.extend(_unlisted(ckpt_dir, manifest))
    return problems


def check_file(ckpt_dir: str, relpath: str, entry: FileEntry) -> Problem | None:
    """Check one file's place, size and checksum against its manifest entry."""
    try:
        full = resolve_inside(ckpt_dir, relpath)
    except UnsafeCheckpointError as exc:
        return exc.problems[0]
    if os.path.islink(os.path.join(ckpt_dir, relpath)):
        return Problem(relpath, "is a symbolic link; savepoint writes only regular files")
    if not os.path.exists(full):
        return Problem(relpath, "missing")
    if not os.path.isfile(full):
        return Problem(relpath, "is not a regular file")
    try:
        size = os.path.getsize(full)
        if size != entry.size:
            return Problem(
                relpath, f"size {size} bytes, manifest says {entry.size} (truncated or overwritten)"
            )
        _, digest = hash_file(full)
    except FileNotFoundError:
        # Deleted between the checks above and the read: retention removing it while a reader verifies
        # (tests/reliability/test_concurrency.py). A problem to report, not a crash of the reader.
        return Problem(relpath, "missing (deleted while it was being checked)")
    except OSError as exc:
        return Problem(relpath, f"unreadable ({exc.strerror or exc})")
    if digest != entry.checksum:
        return Problem(relpath, f"checksum mismatch (xxh3-128 {digest}, manifest says {entry.checksum})")
    return None


def _unlisted(ckpt_dir: str, manifest: Manifest) -> list[Problem]:
    problems = []
    for dirpath, dirs, files in os.walk(ckpt_dir):
        dirs.sort()
        for name in [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
            rel = os.path.relpath(os.path.join(dirpath, name), ckpt_dir).replace(os.sep, "/")
            problems.append(Problem(rel, "a symbolic link to a directory (planted: savepoint writes none)"))
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(dirpath, name), ckpt_dir).replace(os.sep, "/")
            if rel != MANIFEST_NAME and rel not in manifest.files:
                problems.append(Problem(rel, "present but not listed in the manifest (planted or left over)"))
    return problems


def verify_files(ckpt_dir: str, manifest: Manifest, relpaths: list[str]) -> None:
    """Check just these files (before reading them); CorruptCheckpointError naming each bad one."""
    problems = []
    for relpath in relpaths:
        entry = manifest.files.get(relpath)
        if entry is None:
            problems.append(Problem(relpath, "needed but not listed in the manifest"))
            continue
        problem = check_file(ckpt_dir, relpath, entry)
        if problem:
            problems.append(problem)
    if problems:
        raise CorruptCheckpointError(ckpt_dir, problems)


def hash_entry(path: str) -> FileEntry:
    size, digest = hash_file(path)
    return FileEntry(size, digest)
