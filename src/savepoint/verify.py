"""`savepoint.verify`: check every file of one checkpoint, or of every checkpoint under a root."""

from __future__ import annotations

import os
import stat

from savepoint.discovery import STEP_DIR, check_root, is_checkpoint_dir
from savepoint.errors import CheckpointNotFoundError, CorruptCheckpointError, Problem
from savepoint.io.files import list_dir_inside
from savepoint.manifest import find_problems
from savepoint.storage.remote import is_remote_url, verify_remote


def checkpoint_dirs(path: str) -> list[str]:
    """`path` itself if it is a checkpoint, else the `step-N` directories under it."""
    check_root(path, must_exist=True)
    if is_checkpoint_dir(path):
        return [path]
    try:
        entries = list_dir_inside(path)
    except OSError as exc:  # removed since check_root looked (retention by a concurrent writer)
        raise CheckpointNotFoundError(f"{path} disappeared while it was being read ({exc.strerror})") from exc
    dirs = sorted(os.path.join(path, n) for n, _kind in entries if STEP_DIR.match(n))
    # a `step-N` that is a file or lacks its manifest is reported by find_problems, not skipped
    if not dirs:
        raise CorruptCheckpointError(
            path, [Problem("savepoint.json", "missing: not a checkpoint, and no step-N checkpoints under it")]
        )
    return dirs


def verify(path: str | os.PathLike[str]) -> list[str]:
    """Verify a checkpoint or a root of checkpoints; return the verified directories.

    Raises `CorruptCheckpointError` naming every damaged, missing or unlisted file (prefixed with
    its checkpoint directory when `path` is a root).

        >>> savepoint.verify("runs/exp1")            # doctest: +SKIP
        ['runs/exp1/step-00000500', 'runs/exp1/step-00001000']
    """
    path = os.fspath(path)
    if is_remote_url(path):  # s3://, memory://, ...: checked on a downloaded copy
        return verify_remote(path)
    dirs = checkpoint_dirs(path)
    problems: list[Problem] = []
    for d in dirs:
        prefix = "" if d == path else os.path.basename(d) + "/"
        problems += [Problem(prefix + p.path, p.reason) for p in _problems_of(path, d)]
    if problems:
        raise CorruptCheckpointError(
            path, problems, hint="restore an earlier checkpoint or delete the damaged one"
        )
    return dirs


def _problems_of(root: str, ckpt: str) -> list[Problem]:
    """find_problems, after making sure a `step-N` under a root is a real directory, not a link out."""
    if ckpt != root:
        try:
            mode = os.lstat(ckpt).st_mode
        except FileNotFoundError:
            return [Problem("", "disappeared while it was being verified")]
        if stat.S_ISLNK(mode):
            return [Problem("", "is a symbolic link; savepoint follows none out of a root")]
        if not stat.S_ISDIR(mode):
            return [Problem("", "is not a directory")]
    return find_problems(ckpt)
