"""Finding committed checkpoints under a root. Only `step-N` directories with a readable manifest count."""

from __future__ import annotations

import os
import re
import warnings

from savepoint.errors import CheckpointNotFoundError, Problem, SavepointError, UnsafeCheckpointError
from savepoint.io.files import DIRECTORY, list_dir_inside
from savepoint.manifest import Manifest, read_manifest
from savepoint.policy import CheckpointInfo
from savepoint.storage.local import MANIFEST_NAME

# ASCII digits only: `\d` also matches other scripts' digits, which int() accepts, so "step-٠٠٠٠٠٠٠١"
# would pose as step 1 (tests/reliability/test_hostile_paths.py).
STEP_DIR = re.compile(r"^step-([0-9]{8,18})$", re.ASCII)


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def check_root(root: str, *, must_exist: bool) -> None:
    """Clear errors for a root that is missing or is not a directory."""
    if os.path.exists(root) and not os.path.isdir(root):
        raise CheckpointNotFoundError(
            f"{root} is a file, not a directory; a checkpoint root must be a directory"
        )
    if must_exist and not os.path.isdir(root):
        raise CheckpointNotFoundError(
            f"{root} does not exist; check the path (no checkpoint was ever saved there?)"
        )


def info_from_manifest(path: str, manifest: Manifest) -> CheckpointInfo:
    return CheckpointInfo(
        step=manifest.step or 0,
        metrics=manifest.metrics,
        path=path,
        created=manifest.created,
        size=manifest.total_size,
    )


def step_dirs(root: str) -> list[tuple[str, int]]:
    """(name, step) of the real `step-N` directories under `root`, sorted by step.

    Entries are read with `lstat`: a `step-N` symlink (to a directory outside the root, say) is not a
    checkpoint of this root, so it is neither listed, read, nor deleted by retention.
    """
    try:
        entries = list_dir_inside(root)
    except FileNotFoundError:
        return []
    except (NotADirectoryError, SavepointError):
        return []
    out = []
    for name, kind in entries:
        match = STEP_DIR.match(name)
        if match and kind == DIRECTORY:
            out.append((name, int(match.group(1))))
    return sorted(out, key=lambda item: item[1])


def list_checkpoints(root: str, *, warn: bool = True) -> list[CheckpointInfo]:
    """Committed checkpoints under `root`, oldest step first. Unreadable manifests are skipped with a warning.

    One damaged checkpoint (any manifest savepoint refuses, hostile ones included) is skipped, never
    an error for the whole root: listing, "latest", saving and retention go on with the others.
    """
    check_root(root, must_exist=False)
    if not os.path.isdir(root):
        return []
    infos = []
    for name, step in step_dirs(root):
        path = os.path.join(root, name)
        try:
            if not os.path.lexists(os.path.join(path, MANIFEST_NAME)):
                continue  # savepoint never commits a step directory without its manifest: not ours
            manifest = read_manifest(path)
        except FileNotFoundError:
            continue  # deleted by retention while we listed
        except (SavepointError, OSError) as exc:
            if warn:
                warnings.warn(f"skipping {path}: {exc}", stacklevel=2)
            continue
        if manifest.step != step:
            if warn:
                warnings.warn(f"skipping {path}: its manifest says step {manifest.step}", stacklevel=2)
            continue
        infos.append(info_from_manifest(path, manifest))
    return infos


def is_checkpoint_dir(path: str) -> bool:
    """Whether `path` has a manifest entry. A symlink or FIFO there still counts, so that reading it
    reports the damage by name instead of treating the directory as something else."""
    return os.path.lexists(os.path.join(path, MANIFEST_NAME))


def step_path(root: str, step: int, infos: list[CheckpointInfo], *, remote: bool) -> str:
    """The path of committed checkpoint `step` under `root` (`infos`: its listing); a clear error when
    there is none, when it is a link, or when its manifest is damaged."""
    path = os.path.join(root, step_dir_name(step))
    available = ", ".join(str(i.step) for i in infos) or "none"
    missing = CheckpointNotFoundError(f"no checkpoint for step {step} under {root} (available: {available})")
    if remote:
        if all(i.step != step for i in infos):
            raise missing
        return path  # its manifest is read (and a bad one refused) when it is downloaded
    if os.path.islink(path):
        raise UnsafeCheckpointError(
            root,
            [Problem(os.path.basename(path), "is a symbolic link; savepoint follows none out of a root")],
            hint="restore a checkpoint of this root, or point a manager at the directory the link names",
        )
    if not os.path.isdir(path):
        raise missing
    read_manifest(path)  # a damaged or foreign manifest is an error here, not a silent skip
    return path
