"""Finding committed checkpoints under a root. Only `step-N` directories with a readable manifest count."""

from __future__ import annotations

import os
import re
import warnings

from savepoint.errors import CheckpointNotFoundError, CorruptCheckpointError, IncompatibleCheckpointError
from savepoint.manifest import Manifest, read_manifest
from savepoint.policy import CheckpointInfo
from savepoint.storage.local import MANIFEST_NAME

STEP_DIR = re.compile(r"^step-(\d{8,})$")


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


def list_checkpoints(root: str, *, warn: bool = True) -> list[CheckpointInfo]:
    """Committed checkpoints under `root`, oldest step first. Unreadable manifests are skipped with a warning."""
    check_root(root, must_exist=False)
    if not os.path.isdir(root):
        return []
    infos = []
    for name in os.listdir(root):
        match = STEP_DIR.match(name)
        path = os.path.join(root, name)
        if not match or not os.path.isdir(path):
            continue
        if not os.path.lexists(os.path.join(path, MANIFEST_NAME)):
            continue  # savepoint never commits a step directory without its manifest: not ours
        try:
            manifest = read_manifest(path)
        except (CorruptCheckpointError, IncompatibleCheckpointError) as exc:
            if warn:
                warnings.warn(f"skipping {path}: {exc}", stacklevel=2)
            continue
        if manifest.step != int(match.group(1)):
            if warn:
                warnings.warn(f"skipping {path}: its manifest says step {manifest.step}", stacklevel=2)
            continue
        infos.append(info_from_manifest(path, manifest))
    return sorted(infos, key=lambda i: i.step)


def is_checkpoint_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST_NAME))
