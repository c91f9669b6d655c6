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

from savepoint._hashing import CHECKSUM_ALGORITHM, hash_fd, hash_file
from savepoint.errors import (
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    Problem,
    UnsafeCheckpointError,
)
from savepoint.io.files import DIRECTORY, FILE, open_fd_inside, read_bytes_inside, walk_inside
from savepoint.storage.local import MANIFEST_NAME

FORMAT_NAME = "savepoint"
FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 64 * 1024 * 1024  # far above any real manifest; refuses absurd files unread
MAX_FILE_SIZE = 2**62  # a size no file system holds: a claim beyond it is a lie, not a big file
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


def _no_constants(name: str) -> Any:
    # json accepts NaN and Infinity by default; no manifest savepoint writes holds them (allow_nan=False)
    raise _DuplicateKeyError(f"{name} is not a JSON number savepoint writes")


def _finite(value: Any, what: str, ckpt: str) -> float:
    """A JSON number as a finite float; a 400-digit integer overflows float() and is refused, not raised."""
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise _fail(ckpt, f"{what} is {str(value)[:40]}, not a finite number")
    return number


def parse_manifest(raw: bytes, ckpt: str) -> Manifest:
    """Parse and validate manifest bytes; any malformation is a CorruptCheckpointError.

    Every number is a claim: sizes beyond MAX_FILE_SIZE, non-finite metrics or times, and a world size
    larger than the number of files it lists (every rank writes at least its RNG file) are refused,
    so one hostile manifest makes one damaged checkpoint and never an exception elsewhere.
    """
    try:
        doc = json.loads(raw, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
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
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_FILE_SIZE:
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
            raise _fail(ckpt, f"metric {key!r:.80} is not a number")
        _finite(value, f"metric {key!r:.80}", ckpt)
    step = _expect(doc, "step", (int,), ckpt, optional=True)
    if step is not None and not 0 <= step < 10**18:
        raise _fail(ckpt, f"step {str(step)[:40]} is not a step number (0 to 10^18)")
    base = _expect(doc, "base_model", (dict,), ckpt, optional=True)
    versions = _expect(doc, "versions", (dict,), ckpt, optional=True) or {}
    world_size = _expect(doc, "world_size", (int,), ckpt, optional=True)
    if world_size is not None and not 1 <= world_size <= max(1, len(files)):
        raise _fail(
            ckpt, f"world_size {str(world_size)[:40]} cannot be backed by its {len(files)} listed file(s)"
        )
    return Manifest(
        kind=kind,
        files=files,
        step=step,
        created=_finite(_expect(doc, "created", (int, float), ckpt), "created", ckpt),
        metrics={str(k): float(v) for k, v in metrics.items()},
        parent=_expect(doc, "parent", (str,), ckpt, optional=True),
        versions={str(k): str(v) for k, v in versions.items()},
        base_model=base,
        world_size=world_size or 1,
        format_version=version,
    )


def read_manifest(ckpt_dir: str) -> Manifest:
    """Read `ckpt_dir/savepoint.json`; CorruptCheckpointError if it is missing or malformed.

    Opened without following symlinks, regular files only (a FIFO is refused, never waited on), and
    size-checked before it is read.
    """
    return parse_manifest(manifest_bytes(ckpt_dir), ckpt_dir)


def manifest_bytes(ckpt_dir: str) -> bytes:
    """The raw bytes of `ckpt_dir/savepoint.json`, read as `read_manifest` reads them (not parsed)."""
    try:
        return read_bytes_inside(ckpt_dir, MANIFEST_NAME, max_bytes=MAX_MANIFEST_BYTES)
    except UnsafeCheckpointError:
        raise
    except CorruptCheckpointError as exc:  # larger than MAX_MANIFEST_BYTES
        raise _fail(ckpt_dir, f"{exc.problems[0].reason}: larger than any manifest savepoint writes") from exc
    except FileNotFoundError as exc:
        raise _fail(ckpt_dir, "missing: this directory is not a committed savepoint checkpoint") from exc
    except NotADirectoryError as exc:
        raise _fail(ckpt_dir, "the checkpoint path is a file, not a directory") from exc
    except OSError as exc:
        raise _fail(ckpt_dir, f"unreadable ({exc.strerror or exc})") from exc


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
    """The path of `relpath` below `ckpt_dir`, refusing `..`, absolute paths, and any symlink or special
    file on the way (checked by opening it component by component with `O_NOFOLLOW`).

    Prefer `savepoint.io.files.open_inside`, which hands back the very file that was checked; this is
    for libraries that take a path. A missing file is returned as is: the caller reports it.
    """
    check_relpath(relpath, ckpt_dir)
    try:
        fd, _ = open_fd_inside(ckpt_dir, relpath)
    except FileNotFoundError:
        pass
    else:
        os.close(fd)
    return os.path.join(ckpt_dir, relpath)


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
    """Check one file's place, size and checksum against its manifest entry.

    The file is opened without following any symlink below `ckpt_dir` and must be a regular file;
    its size comes from the open descriptor and the checksum from the same descriptor's bytes.
    """
    try:
        check_relpath(relpath, ckpt_dir)
        fd, size = open_fd_inside(ckpt_dir, relpath)
    except UnsafeCheckpointError as exc:
        return exc.problems[0]
    except FileNotFoundError:
        # Also a file deleted while a reader verifies (retention by a concurrent writer:
        # tests/reliability/test_concurrency.py). A problem to report, not a crash of the reader.
        return Problem(relpath, "missing")
    except OSError as exc:
        return Problem(relpath, f"unreadable ({exc.strerror or exc})")
    try:
        if size != entry.size:
            return Problem(
                relpath, f"size {size} bytes, manifest says {entry.size} (truncated or overwritten)"
            )
        _, digest = hash_fd(fd)
    except OSError as exc:
        return Problem(relpath, f"unreadable ({exc.strerror or exc})")
    finally:
        os.close(fd)
    if digest != entry.checksum:
        return Problem(relpath, f"checksum mismatch (xxh3-128 {digest}, manifest says {entry.checksum})")
    return None


def _unlisted(ckpt_dir: str, manifest: Manifest) -> list[Problem]:
    """Entries the manifest does not vouch for: planted files, symlinks, FIFOs, and over-deep trees."""
    problems = []
    try:
        for rel, kind in walk_inside(ckpt_dir):
            if kind == DIRECTORY or rel == MANIFEST_NAME or rel in manifest.files:
                continue  # a listed file that is a symlink or a FIFO was reported by check_file
            if kind == FILE:
                problems.append(Problem(rel, "present but not listed in the manifest (planted or left over)"))
            else:
                what = "a symbolic link" if kind == "symlink" else "not a regular file (FIFO, socket, device)"
                problems.append(Problem(rel, f"{what}, not listed in the manifest (savepoint writes none)"))
    except FileNotFoundError:
        problems.append(Problem(".", "the checkpoint directory disappeared while it was checked"))
    except CorruptCheckpointError as exc:  # nesting beyond the depth limit, or a directory swapped for a link
        problems.extend(exc.problems)
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
