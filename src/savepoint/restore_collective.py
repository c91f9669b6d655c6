"""Restoring a checkpoint written at any world size into this rank (or a plain process).

    apply = prepare_collective(path, manifest, model=model, optimizer=opt)   # read, verify, vote
    result = apply()                                                          # change live state

Read and verify, then vote, then apply:
1. What each rank can do alone: metadata, shapes, the small blobs and plain weight files, each file
   checked against the manifest in the one read that decodes it. Vote.
2. The collective reads (DCP shards, each item checked against its recorded checksum as it is read;
   a peft adapter), into fresh buffers. A vote after each, so a rank that failed alone never leaves
   the others waiting in the next collective.
3. Only then does live state change: stateful objects, optimizer, model, scheduler, RNG.

Damage found by any rank is a vote "damaged": every rank then raises the same CorruptCheckpointError
naming it, so that a manager falls back to the previous step on every rank together.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from savepoint import distributed
from savepoint.distributed import DistributedSaveError, agree, rank, unwrap_optimizer
from savepoint.errors import CorruptCheckpointError, Problem, UnsafeCheckpointError
from savepoint.formats import hf, sharded
from savepoint.formats.rank_state import read_rank_blobs
from savepoint.manifest import Manifest
from savepoint.restore_model import Step, plan_model, ready
from savepoint.restore_optimizer import plan_optimizer
from savepoint.restore_state import (
    RestoreResult,
    apply_stateful,
    check_blobs,
    finish_restore,
    verify_side_files,
)
from savepoint.verified_read import verify_share


def prepare_collective(
    path: str,
    manifest: Manifest,
    *,
    model: torch.nn.Module,
    optimizer: Any = None,
    scheduler: Any = None,
    stateful: Mapping[str, Any] | None = None,
    timeout: float | None = None,
) -> Callable[[], RestoreResult]:
    """Every check and read of a restore, voted on by all ranks; returns the step that changes state.

    Collective: every rank calls it. Raises CorruptCheckpointError on every rank when any rank found
    damage, the failing rank's own error there (DistributedSaveError on the others) for anything else.
    """
    from savepoint.integrations import deepspeed as ds

    if ds.is_engine(model):
        # DeepSpeed reads its own files inside engine.load_checkpoint, where damage could no longer be
        # voted on: the checkpoint is verified whole first (each file by one rank), and damage on any
        # rank is damage on every rank.
        failure = None
        try:
            verify_share(path, manifest, manifest.files, rank=rank(), world_size=distributed.world_size())
        except BaseException as exc:
            failure = exc
        vote(failure, path=path, what=f"restore of {path}", timeout=timeout)
        return lambda: ds.restore(
            path, manifest, engine=model, optimizer=optimizer, scheduler=scheduler, stateful=stateful
        )
    model = hf.unwrap_model(model)
    optimizer = unwrap_optimizer(optimizer) if optimizer is not None else None
    stateful = dict(stateful or {})
    warn_world_size(path, manifest, stateful)
    what = f"restore of {path}"
    error, blobs = None, {}
    model_step, optimizer_step = ready(lambda: None), ready(lambda: None)
    try:
        metadata = sharded.read_metadata(path, manifest) if sharded.has_dcp(manifest) else None
        model_step = plan_model(model, path, manifest, metadata)
        blobs = read_rank_blobs(
            path, manifest, rank=rank(), optimizer=optimizer, scheduler=scheduler, stateful=stateful
        )
        check_blobs(path, blobs, scheduler=scheduler, stateful=stateful)
        if optimizer is not None:
            optimizer_step = plan_optimizer(model, optimizer, path, manifest, blobs, metadata)
        verify_side_files(path, manifest)
    except BaseException as exc:
        error = exc
    vote(error, path=path, what=what, timeout=timeout)  # later collectives reuse this group
    # The model's reads first: the optimizer's step undoes its own initialisation when it fails.
    load_model = _staged(model_step, path=path, what=f"{what} (model)")
    load_optimizer = _staged(optimizer_step, path=path, what=f"{what} (optimizer)")

    def apply() -> RestoreResult:
        apply_stateful(blobs, stateful)
        load_optimizer()  # before the model: it may hold views of the parameters
        load_model()
        return finish_restore(path, manifest, blobs, scheduler=scheduler, stateful={})

    return apply


def _staged(step: Step, *, path: str, what: str) -> Callable[[], object]:
    apply, error = None, None
    try:
        apply = step.stage()
    except BaseException as exc:
        error = exc
    vote(error, path=path, what=what, timeout=None)
    assert apply is not None
    return apply


def vote(error: BaseException | None, *, path: str, what: str, timeout: float | None) -> None:
    """Every rank's outcome of one phase of a restore: return when every rank succeeded.

    Damage (a CorruptCheckpointError) on any rank raises CorruptCheckpointError on every rank, naming
    what each rank found; any other error is raised by its rank and DistributedSaveError elsewhere."""
    damage = None
    if isinstance(error, CorruptCheckpointError):
        damage = (isinstance(error, UnsafeCheckpointError), [(p.path, p.reason) for p in error.problems])
    try:
        verdicts = agree(None if damage else error, damage, timeout=timeout, what=what)
    except DistributedSaveError as exc:
        if exc is error:
            raise
        lines = "; ".join(f"rank {r}: {m}" for r, m in sorted(exc.failed.items())) or str(exc)
        raise DistributedSaveError(
            f"{what} was refused, nothing was changed on any rank: {lines}", failed=exc.failed
        ) from exc
    damaged = {r: d for r, d in enumerate(verdicts) if d}
    if not damaged:
        return
    if isinstance(error, CorruptCheckpointError) and len(damaged) == 1:
        raise error
    # DCP hands a read error to every rank, so several ranks may report the same problem.
    reporters: dict[tuple[str, str], list[int]] = {}
    unsafe = any(is_unsafe for is_unsafe, _ in damaged.values())
    for r, (_, found) in sorted(damaged.items()):
        for p, reason in found:
            reporters.setdefault((p, reason), []).append(r)
    problems = [
        Problem(p, f"{reason} (reported by rank {', '.join(map(str, ranks))})")
        for (p, reason), ranks in sorted(reporters.items())
    ]
    raise (UnsafeCheckpointError if unsafe else CorruptCheckpointError)(path, problems) from error


def warn_world_size(path: str, manifest: Manifest, stateful: Mapping[str, Any]) -> None:
    now = distributed.world_size()
    if manifest.world_size == now or rank() != 0:
        return
    lost = (
        [f"RNG state of rank(s) {', '.join(map(str, range(now, manifest.world_size)))} is dropped"]
        if now < manifest.world_size
        else [
            f"ranks {manifest.world_size}..{now - 1} have no RNG state of their own and keep their current one"
        ]
    )
    if stateful and manifest.world_size > 1:
        lost.append(
            f"stateful objects ({', '.join(sorted(stateful))}) get their own rank's saved state where one "
            "exists, else rank 0's: data-loader positions do not match the new sharding of the data"
        )
    warnings.warn(
        f"{path} was saved by {manifest.world_size} rank(s) and is restored at {now}: model and optimizer state "
        f"are resharded exactly, but the continued run cannot be bit-identical: {'; '.join(lost)}",
        stacklevel=5,
    )
