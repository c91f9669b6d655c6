"""The small state every restore path shares: checking decoded blobs against their targets, and the
last steps that change live objects (stateful objects, scheduler, RNGs) once everything is read.

Used by the local restore (`restoring.py`), the collective one (`restore_collective.py`) and
DeepSpeed's (`integrations/deepspeed.py`), so that none of them imports another.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from savepoint import distributed
from savepoint.errors import CorruptCheckpointError, Problem
from savepoint.formats import stateful as stateful_format
from savepoint.formats import train_state
from savepoint.formats.rank_state import rng_relbase
from savepoint.manifest import Manifest
from savepoint.storage.remote import left_in_store
from savepoint.verified_read import verify_share


@dataclass(frozen=True)
class RestoreResult:
    """What `restore()` found. `step` is 0 and `path` None when there was nothing to restore."""

    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    path: str | None = None


def verify_side_files(path: str, manifest: Manifest) -> None:
    """What no restore step reads is still checked, each file by one rank (`verify_share`), so a
    checkpoint with a damaged or missing file is refused as damaged: the side files (config,
    tokenizer, metrics: neither train state nor weights) are checksummed, and every other file is
    checked to be there at its listed size (a stat, no read). What a restore reads is checked in the
    read itself."""
    side = [
        p
        for p in manifest.files
        if not p.startswith(f"{train_state.TRAIN_STATE_DIR}/")
        and not p.endswith((".safetensors", ".safetensors.index.json"))
    ]
    rank, world = distributed.rank(), distributed.world_size()
    left = left_in_store(path)  # a rank's partial copy of an object-store checkpoint: checked as downloaded
    side = [p for p in side if p not in left]
    verify_share(path, manifest, side, rank=rank, world_size=world)
    rest = manifest.files.keys() - set(side) - left
    verify_share(path, manifest, rest, rank=rank, world_size=world, content=False)


def check_blobs(path: str, blobs: dict[str, Any], *, scheduler: Any, stateful: Mapping[str, Any]) -> None:
    """Check the decoded small state against its targets, before any live object changes."""
    if scheduler is not None:
        train_state.check_scheduler_state(scheduler, blobs["scheduler"], path)
    for name, obj in stateful.items():
        stateful_format.check(obj, blobs[f"stateful/{name}"], path, f"stateful/{name}")
    if "rng" in blobs:
        train_state.check_rng_state(blobs["rng"], path, f"{rng_relbase(distributed.rank())}.json")
    if not isinstance(blobs.get("extra") or {}, dict):
        raise CorruptCheckpointError(
            path, [Problem(f"{train_state.TRAIN_STATE_DIR}/extra.json", "not a mapping")]
        )


def apply_stateful(blobs: dict[str, Any], stateful: Mapping[str, Any]) -> None:
    """The user's objects first: their `load_state_dict` is code that may still refuse its state, and
    then nothing else has changed yet."""
    for name, obj in stateful.items():
        stateful_format.restore(obj, blobs[f"stateful/{name}"])


def finish_restore(
    path: str, manifest: Manifest, blobs: dict[str, Any], *, scheduler: Any, stateful: Mapping[str, Any]
) -> RestoreResult:
    """The last steps of every restore path: stateful objects not yet restored, scheduler, then the
    RNGs, and the result."""
    apply_stateful(blobs, stateful)
    if scheduler is not None:
        scheduler.load_state_dict(blobs["scheduler"])
    if "rng" in blobs:  # last: restoring the objects above may draw from the global RNGs
        train_state.set_rng_state(blobs["rng"])
    return RestoreResult(
        step=manifest.step or 0, metrics=dict(manifest.metrics), extra=blobs.get("extra") or {}, path=path
    )
