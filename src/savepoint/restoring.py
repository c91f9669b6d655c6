"""Restoring one checkpoint into live objects: read and verify everything, check it fits, then change
things.

    apply = prepare_restore(path, model=model, optimizer=opt)   # reads, verifies, checks; changes nothing
    result = apply()                                            # the live objects change

Each file a restore uses is read once, and checked against the manifest in that same read
(`verified_read`; DCP items against their recorded checksums): weights into buffers of their own,
optimizer moments and the small state decoded, scheduler keys matched against its own `state_dict()`,
RNG states decoded into throwaway generators, all before the first live object changes, so a damaged
or mismatched checkpoint changes nothing. Files no step reads (config, tokenizer) are checksummed too.
Then the user's stateful objects go first (their `load_state_dict` is code that may still refuse),
the RNGs last. Under torchrun (or for a checkpoint written by one) `restore_collective.prepare_collective` does the same
with a vote between the phases.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from savepoint import distributed
from savepoint.errors import IncompatibleCheckpointError
from savepoint.formats import train_state
from savepoint.formats.hf import unwrap_model
from savepoint.formats.rank_state import rng_relbase, stateful_relbase
from savepoint.formats.sharded import has_dcp
from savepoint.manifest import Manifest, read_manifest
from savepoint.pipeline.job import is_peft_model
from savepoint.pipeline.sources import is_collective
from savepoint.restore_collective import prepare_collective
from savepoint.restore_model import plan_model_files
from savepoint.restore_state import (
    RestoreResult,
    apply_stateful,
    check_blobs,
    finish_restore,
    verify_side_files,
)

__all__ = [
    "RestoreResult",
    "apply_stateful",
    "check_blobs",
    "finish_restore",
    "prepare_restore",
    "restore_checkpoint",
]


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
    """Restore checkpoint `path` into the given objects; nothing changes unless every part checks out.

    `verified` is accepted for older callers and has no effect: every file is checked as it is read."""
    del verified
    return prepare_restore(
        path, model=model, optimizer=optimizer, scheduler=scheduler, stateful=stateful, timeout=timeout
    )()


def prepare_restore(
    path: str,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    stateful: Mapping[str, Any] | None = None,
    manifest: Manifest | None = None,
    timeout: float | None = None,
) -> Callable[[], RestoreResult]:
    """Read, verify and check checkpoint `path` against the targets; return the step that applies it.

    `manifest`: the checkpoint's, when the caller has already read it.
    A CorruptCheckpointError from here means the checkpoint is damaged (on some rank, under torchrun:
    then on every rank) and nothing has changed: a caller may fall back to an earlier one.
    """
    manifest = manifest if manifest is not None else read_manifest(path)
    if is_collective(model) or has_dcp(manifest) or manifest.world_size > 1:  # torchrun or its output
        return prepare_collective(
            path,
            manifest,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            stateful=stateful,
            timeout=timeout,
        )
    model = unwrap_model(model)
    stateful = dict(stateful or {})
    load_model = _plan_model_load(model, path, manifest)
    blobs = _read_blobs(path, manifest, optimizer=optimizer, scheduler=scheduler, stateful=stateful)
    optimizer_sd = None
    if optimizer is not None:
        optimizer_sd = train_state.prepare_optimizer_state(optimizer, model, blobs["optimizer"], path)
    check_blobs(path, blobs, scheduler=scheduler, stateful=stateful)
    verify_side_files(path, manifest)

    def apply() -> RestoreResult:
        apply_stateful(blobs, stateful)
        load_model()
        if optimizer is not None and optimizer_sd is not None:
            optimizer.load_state_dict(optimizer_sd)
        return finish_restore(path, manifest, blobs, scheduler=scheduler, stateful={})

    return apply


def _read_blobs(
    path: str, manifest: Manifest, *, optimizer: Any, scheduler: Any, stateful: Mapping[str, Any]
) -> dict[str, Any]:
    """Decode every blob the targets need (and RNG and extra), refusing what is absent."""
    ts = train_state.TRAIN_STATE_DIR
    wanted = {"extra": f"{ts}/extra"}
    missing = []
    if optimizer is not None:
        wanted["optimizer"] = f"{ts}/optimizer"
    if scheduler is not None:
        wanted["scheduler"] = f"{ts}/scheduler"
    for name in stateful:
        wanted[f"stateful/{name}"] = stateful_relbase(name)
    for key, relbase in wanted.items():
        if key != "extra" and not train_state.has_blob(manifest, relbase):
            missing.append(f"{key} (no {relbase}.json: it was saved without it)")
    if missing:
        raise IncompatibleCheckpointError(
            f"checkpoint {path} lacks state that restore() was asked for; pass only what was saved:",
            mismatches=missing,
        )
    out = {
        k: train_state.read_blob(path, manifest, rb)
        for k, rb in wanted.items()
        if train_state.has_blob(manifest, rb)
    }
    rng = rng_relbase(distributed.rank())
    if train_state.has_blob(manifest, rng):
        out["rng"] = train_state.read_blob(path, manifest, rng)
    else:
        warnings.warn(
            f"{path} holds no RNG state for rank {distributed.rank()} (saved at world size {manifest.world_size}); "
            "random draws after resume will differ from an uninterrupted run",
            stacklevel=4,
        )
    return out


def _plan_model_load(model: torch.nn.Module, path: str, manifest: Manifest) -> Callable[[], None]:
    """Read the model files (checked as they are read) and check they fit `model`; return the
    function that loads them."""
    if manifest.kind == "adapter" or is_peft_model(model):
        if manifest.kind != "adapter" or not is_peft_model(model):
            raise IncompatibleCheckpointError(
                f"{path} holds a {'LoRA adapter' if manifest.kind == 'adapter' else 'full model'} but the model "
                f"given is {'not ' if manifest.kind == 'adapter' else ''}a peft PeftModel; restore into the same kind of model"
            )
        from savepoint.formats import peft as peft_format

        return peft_format.plan_adapter_load(model, path, manifest)
    return plan_model_files(model, path, manifest)
