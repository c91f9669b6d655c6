"""Copying a source directory's small files (config, generation config, tokenizer) into an output.

merge-lora, export and consolidate publish files they did not write. The source (a checkpoint, a base
model, an adapter) may come from someone else (DESIGN.md, promise 4), so every copied file is:

- confined: opened below the source directory without following any symlink, regular files only
  (a FIFO is refused before it could block), size-checked before a byte is read;
- vouched for: when the source has a savepoint manifest, the file must be listed in it, and the bytes
  copied (hashed as they are written into the staged output) must match the listed checksum. The
  check is on the copied bytes themselves, so nothing is read twice and nothing can change in between.

A failure raises a `CorruptCheckpointError` naming the file; the caller aborts its staged output, so
nothing unverified is ever published.

    >>> copy_present(staged, "models/llama-1b", ("generation_config.json",), subdir="")  # doctest: +SKIP
    ['generation_config.json']
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch

from savepoint._json import read_json_inside
from savepoint.errors import CorruptCheckpointError, Problem, SavepointError
from savepoint.formats.hf import WEIGHTS_INDEX_NAME
from savepoint.io.files import FILE, list_dir_inside, open_inside
from savepoint.manifest import Manifest, read_manifest
from savepoint.storage.local import MANIFEST_NAME, StagedDir

MAX_SIDE_FILE_BYTES = 1 << 30  # a tokenizer is tens of MB; anything past 1 GiB is not a side file
_CHUNK = 16 * 1024 * 1024
# Files of a checkpoint that do not belong in a model directory.
_NOT_MODEL_FILES = {MANIFEST_NAME, "metrics.json"}


def source_manifest(src_dir: str) -> Manifest | None:
    """The source's manifest when it has one (a savepoint checkpoint or export), else None."""
    if not os.path.lexists(os.path.join(src_dir, MANIFEST_NAME)):
        return None
    return read_manifest(src_dir)


def copy_checked(
    staged: StagedDir, src_dir: str, relpath: str, dest: str, manifest: Manifest | None
) -> Problem | None:
    """Copy `src_dir/relpath` to `dest` in `staged`; the problem with it (nothing raised) if any.

    With a `manifest`, an unlisted file is not copied at all and a size that differs from the listed
    one is refused before reading; the checksum is compared on the bytes copied.
    """
    entry = manifest.files.get(relpath) if manifest is not None else None
    if manifest is not None and entry is None:
        return Problem(relpath, "present but not listed in the manifest (planted or left over)")
    try:
        with open_inside(src_dir, relpath, max_bytes=MAX_SIDE_FILE_BYTES) as src:
            size = os.fstat(src.fileno()).st_size
            if entry is not None and size != entry.size:
                return Problem(relpath, f"size {size} bytes, manifest says {entry.size}")
            with staged.create(dest) as out:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
    except CorruptCheckpointError as exc:  # a symlink, a special file, or over the size cap
        return exc.problems[0]
    except FileNotFoundError:
        return Problem(relpath, "missing")
    except OSError as exc:
        return Problem(relpath, f"unreadable ({exc.strerror or exc})")
    if entry is not None and staged.entries[dest] != (entry.size, entry.checksum):
        return Problem(relpath, f"checksum mismatch (the manifest lists {entry.checksum})")
    return None


def copy_files(staged: StagedDir, src_dir: str, pairs: Iterable[tuple[str, str]]) -> list[str]:
    """Copy each (relpath, dest) from `src_dir`, checked against its manifest if it has one.

    Every problem is collected first, then raised together as one CorruptCheckpointError.
    """
    manifest = source_manifest(src_dir)
    copied, problems = [], []
    for relpath, dest in pairs:
        problem = copy_checked(staged, src_dir, relpath, dest, manifest)
        if problem is None:
            copied.append(relpath)
        else:
            problems.append(problem)
    if problems:
        raise CorruptCheckpointError(
            src_dir, problems, hint="nothing was written; use an intact source, or remove the planted files"
        )
    return copied


def copy_present(staged: StagedDir, src_dir: str, names: Iterable[str], subdir: str) -> list[str]:
    """Copy those of `names` that are present at the top of `src_dir` into `subdir`; return those copied.

    A name that is there as a symlink or a special file is refused (CorruptCheckpointError), not skipped:
    an output missing its tokenizer without a word would be worse than an error.
    """
    present = dict(_top_level(src_dir))
    wanted = [n for n in names if n in present]
    return copy_files(staged, src_dir, [(n, os.path.join(subdir, n)) for n in wanted])


def copy_model_side_files(src_dir: str, staged: StagedDir, *, skip: Callable[[str], bool]) -> list[str]:
    """Copy every top-level file of `src_dir` but those `skip(name)` names (weights, savepoint's own).

    With a manifest, unlisted files are refused; without one, symlinks and special files are left
    behind (a bare directory's links lead outside it) and regular files copied.
    """
    manifest = source_manifest(src_dir)
    names = [n for n, kind in _top_level(src_dir) if not skip(n) and n != MANIFEST_NAME]
    if manifest is None:
        names = [n for n, kind in _top_level(src_dir) if n in names and kind == FILE]
    return copy_files(staged, src_dir, [(n, n) for n in names])


def _top_level(src_dir: str) -> list[tuple[str, str]]:
    """(name, kind) of the source's top-level entries other than directories."""
    try:
        return [(n, kind) for n, kind in list_dir_inside(src_dir) if kind != "directory"]
    except OSError as exc:
        raise SavepointError(f"cannot list {src_dir} ({exc.strerror or exc}); check the path") from exc


def copy_checkpoint_side_files(directory: str, staged: StagedDir) -> None:
    """config, generation config and tokenizer files: every top-level file but ours and the weights,
    confined to `directory` and checked against its manifest when it has one (`savepoint.side_files`)."""
    copy_model_side_files(directory, staged, skip=_not_a_side_file)


def _not_a_side_file(name: str) -> bool:
    return name in _NOT_MODEL_FILES or name.endswith(".safetensors") or name == WEIGHTS_INDEX_NAME


def set_config_dtype(staged: StagedDir, dtype: torch.dtype) -> None:
    """Record the dtype the weights were converted to in the staged config.json."""
    path = staged.abspath("config.json")

    def fail(reason: str) -> CorruptCheckpointError:  # the copied (verified) source config is malformed
        return CorruptCheckpointError(
            staged.path,
            [Problem("config.json", reason)],
            hint="nothing was written; fix the source's config.json",
        )

    config: dict[str, Any] = read_json_inside(staged.path, "config.json", fail)
    if not isinstance(config, dict):
        raise fail("is not a JSON object")
    config["dtype"] = str(dtype).removeprefix("torch.")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
