"""The small state a rank restores under torchrun (optimizer JSON, scheduler, stateful objects, extra,
its own RNG), each file checked against the manifest in the one read that decodes it.

Stateful objects are looked up per rank first (`train_state/stateful/rank-<r>/<name>`, written by a
collective save), then rank 0's, then the single-process location: a job restored at another world
size still finds a state for every object.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from savepoint.distributed import rank
from savepoint.errors import IncompatibleCheckpointError
from savepoint.formats import sharded, train_state
from savepoint.manifest import Manifest
from savepoint.saving import rng_relbase, stateful_relbase

_TS = train_state.TRAIN_STATE_DIR


def rank_stateful_relbase(name: str, rank_: int) -> str:
    """Where a collective save puts rank `rank_`'s state of stateful object `name` (the same layout as
    `collective.per_rank_stateful_relbase`, which writes it)."""
    base = stateful_relbase(name)
    return f"{os.path.dirname(base)}/rank-{rank_:05d}/{os.path.basename(base)}"


def read_restore_blobs(
    path: str, manifest: Manifest, *, optimizer: Any, scheduler: Any, stateful: Mapping[str, Any]
) -> dict[str, Any]:
    """Decode every blob this rank's targets need (and extra, and this rank's RNG); refuse what was
    asked for but not saved. Keys: "optimizer", "scheduler", "stateful/<name>", "extra", "rng"."""
    wanted: dict[str, str] = {}
    if optimizer is not None:
        wanted["optimizer"] = (
            sharded.GROUPS_BLOB if sharded.has_sharded_optimizer(manifest) else f"{_TS}/optimizer"
        )
    if scheduler is not None:
        wanted["scheduler"] = f"{_TS}/scheduler"
    for name in stateful:
        candidates = [
            rank_stateful_relbase(name, rank()),
            rank_stateful_relbase(name, 0),
            stateful_relbase(name),
        ]
        wanted[f"stateful/{name}"] = next(
            (c for c in candidates if train_state.has_blob(manifest, c)), candidates[-1]
        )
    missing = [
        f"{k} (no {rb}.json: it was saved without it)"
        for k, rb in wanted.items()
        if not train_state.has_blob(manifest, rb)
    ]
    if missing:
        raise IncompatibleCheckpointError(
            f"checkpoint {path} lacks state that restore() was asked for; pass only what was saved:",
            mismatches=missing,
        )
    for key, relbase in {"extra": f"{_TS}/extra", "rng": rng_relbase(rank())}.items():
        if train_state.has_blob(manifest, relbase):
            wanted[key] = relbase
    return {key: train_state.read_blob(path, manifest, relbase) for key, relbase in wanted.items()}
