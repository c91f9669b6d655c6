"""Where a checkpoint keeps the small state of a training run, and reading the part one rank needs.

    train_state/rng/rank-00003.{json,safetensors}      every rank's RNG state
    train_state/stateful/NAME.*                        a stateful object, saved by one process
    train_state/stateful/rank-00003/NAME.*             the same, saved by rank 3 of a multi-rank job
    train_state/{optimizer,scheduler,extra}.*          rank 0's (optimizer_groups.* when sharded)

Each name is a blob's base (formats/train_state.py adds `.json` and `.safetensors`). Save and restore,
at any world size, and the DeepSpeed integration all name files through these functions.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from savepoint.errors import IncompatibleCheckpointError
from savepoint.formats import sharded, train_state
from savepoint.manifest import Manifest

TS = train_state.TRAIN_STATE_DIR
_NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def stateful_relbase(name: str) -> str:
    if not name or not set(name) <= _NAME_OK or name.startswith("."):
        raise ValueError(
            f"stateful name {name!r} must be non-empty letters, digits, '_', '.', '-' (it names a file)"
        )
    return f"{TS}/stateful/{name}"


def per_rank_stateful_relbase(name: str, rank: int) -> str:
    base = stateful_relbase(name)
    return f"{os.path.dirname(base)}/rank-{rank:05d}/{os.path.basename(base)}"


def rng_relbase(rank: int) -> str:
    return f"{TS}/rng/rank-{rank:05d}"


def read_rank_blobs(
    path: str,
    manifest: Manifest,
    *,
    rank: int,
    optimizer: Any,
    scheduler: Any,
    stateful: Mapping[str, Any],
) -> dict[str, Any]:
    """Decode the blobs rank `rank` restores (its own stateful objects where saved per rank, else rank
    0's or the one-process ones), refusing what a target asks for and the checkpoint lacks."""
    wanted: dict[str, str] = {}
    if optimizer is not None:
        wanted["optimizer"] = (
            sharded.GROUPS_BLOB if sharded.has_sharded_optimizer(manifest) else f"{TS}/optimizer"
        )
    if scheduler is not None:
        wanted["scheduler"] = f"{TS}/scheduler"
    for name in stateful:
        candidates = [
            per_rank_stateful_relbase(name, rank),
            per_rank_stateful_relbase(name, 0),
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
    for key, relbase in {"extra": f"{TS}/extra", "rng": rng_relbase(rank)}.items():
        if train_state.has_blob(manifest, relbase):
            wanted[key] = relbase
    return {key: train_state.read_blob(path, manifest, relbase) for key, relbase in wanted.items()}
