"""Where every restore starts: read the manifest, verify the files (unless the caller just did), then the
one-process path (restoring.py) or the collective one (collective.py), which also reads checkpoints
written by several ranks into a plain process."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from savepoint.errors import CorruptCheckpointError
from savepoint.formats.sharded import has_dcp
from savepoint.manifest import find_problems, read_manifest
from savepoint.pipeline.sources import is_collective
from savepoint.restoring import RestoreResult, restore_local


def restore_checkpoint(
    path: str,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    stateful: Mapping[str, Any] | None = None,
    verified: bool = False,
    timeout: float | None = None,
) -> RestoreResult:
    manifest = read_manifest(path)
    if not verified:
        problems = find_problems(path, manifest, check_unlisted=False)
        if problems:
            raise CorruptCheckpointError(path, problems)
    if is_collective(model) or has_dcp(manifest) or manifest.world_size > 1:  # torchrun or its output
        from savepoint.collective import restore_collective

        return restore_collective(
            path,
            manifest,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            stateful=stateful,
            timeout=timeout,
        )
    return restore_local(
        path, manifest, model=model, optimizer=optimizer, scheduler=scheduler, stateful=stateful
    )
