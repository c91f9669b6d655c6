"""A restore under torchrun: rank 0 picks the step and every rank restores that one, or none does.

Rank 0 names its candidates (newest first for "latest") and broadcasts them; every rank reads and
verifies its part of a candidate in its own view of the root, and the ranks vote
(`restore_collective.vote`). Damage found by any rank while reading makes all ranks fall back together;
a rank that does not see the step at all (different roots, a root not shared) fails every rank. Every
collective here runs on the one coordination group, within `dist_timeout`.

Cost per rank at W ranks: one broadcast of the candidate list, one vote per phase of each candidate
tried (a gather of O(1) records), and the reads of its own part of the checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from savepoint import discovery, distributed
from savepoint.errors import CheckpointNotFoundError, CorruptCheckpointError
from savepoint.manifest import read_manifest
from savepoint.restore_collective import vote
from savepoint.restoring import RestoreResult, prepare_restore
from savepoint.storage.remote import RemoteRoot
from savepoint.storage.remote_restore import rank_copy


def restore_agreed(
    root: str,
    remote: RemoteRoot | None,
    targets: dict[str, Any],
    *,
    candidates: Callable[[], list[int]],
    sees_any: Callable[[], bool],
    latest: bool,
    timeout: float | None,
) -> RestoreResult:
    """Restore into `targets` the first of rank 0's `candidates()` that every rank reads intact.

    `sees_any()`: whether this rank sees any checkpoint under `root` (asked only when rank 0 sees none).
    `latest`: fall back past damaged candidates (with a warning) instead of raising."""
    what = f"restore from {root}"
    with refusal(what):  # rank 0's own error is raised there; the others name it
        chosen = distributed.on_rank0(candidates, timeout=timeout, what=what)
    if not chosen:  # rank 0 sees none: a rank that sees one must not silently start at step 0 with it
        unseen: BaseException | None = None
        if distributed.rank() != 0 and sees_any():
            unseen = CheckpointNotFoundError(
                f"rank {distributed.rank()} sees checkpoint(s) under {root} but rank 0 sees none: the "
                "ranks see different checkpoints (different root paths, or a root that is not shared). Give "
                "every rank the same root on a shared filesystem, or an object-store root (s3://...)."
            )
        with refusal(what):
            distributed.agree(unseen, timeout=timeout, what=what)
    for number in chosen:
        path = os.path.join(root, discovery.step_dir_name(number))
        step_what = f"{what}, step {number}"
        with contextlib.ExitStack() as stack:
            try:
                with refusal(step_what):
                    apply = _prepare(stack, root, remote, path, number, targets, step_what, timeout)
            except CorruptCheckpointError as exc:  # raised on every rank: the vote
                if not latest:
                    raise
                warnings.warn(
                    f"{what}: step {number} is damaged; every rank falls back to the previous checkpoint ({exc})",
                    stacklevel=4,
                )
                continue
            return dataclasses.replace(apply(), path=path)
    return RestoreResult(step=0)


def _prepare(
    stack: contextlib.ExitStack,
    root: str,
    remote: RemoteRoot | None,
    path: str,
    number: int,
    targets: dict[str, Any],
    what: str,
    timeout: float | None,
) -> Callable[[], RestoreResult]:
    error, local, manifest = None, path, None
    try:
        if remote is not None:  # an object store: this rank downloads only what it reads
            part = rank_copy(
                remote, path, rank=distributed.rank(), model=targets["model"], optimizer=targets["optimizer"]
            )
            local = stack.enter_context(part)
        elif not os.path.isdir(path):
            raise CheckpointNotFoundError(
                f"rank {distributed.rank()} sees no checkpoint for step {number} under {root}, "
                "which rank 0 chose: the ranks see different checkpoints (different root paths, or "
                "a root that is not shared). Give every rank the same root on a shared filesystem, "
                "or an object-store root (s3://...)."
            )
        manifest = read_manifest(local)
    except BaseException as exc:
        error = exc
    vote(error, path=path, what=what, timeout=timeout)
    try:
        return prepare_restore(local, **targets, manifest=manifest, timeout=timeout)
    except CorruptCheckpointError as exc:
        if local == path:
            raise
        # Name the checkpoint in the store, not this rank's temporary download of it.
        raise type(exc)(path, exc.problems, exc.hint) from exc


@contextlib.contextmanager
def refusal(what: str) -> Iterator[None]:
    """Another rank's error from a restore vote, worded for a restore (nothing changed, not "committed")."""
    try:
        yield
    except distributed.DistributedSaveError as exc:
        if not exc.failed:
            raise
        lines = "; ".join(f"rank {r}: {m}" for r, m in sorted(exc.failed.items()))
        raise distributed.DistributedSaveError(
            f"{what} was refused, nothing was changed on any rank: {lines}", failed=exc.failed
        ) from exc
