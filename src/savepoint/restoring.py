"""Restoring one checkpoint into live objects: verify everything, check it fits, then change things.

Order matters: every file is checksummed and every piece of state decoded and matched against its
target (weights and optimizer moments against the parameters' shapes, the scheduler's keys against its
own `state_dict()`, RNG states decoded into throwaway generators) before the first live object
changes, so a bad checkpoint changes nothing. Then the user's stateful objects go first (their
`load_state_dict` is code that may still refuse), the RNGs last.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from savepoint import distributed
from savepoint.errors import CorruptCheckpointError, IncompatibleCheckpointError, Problem
from savepoint.formats import stateful as stateful_format
from savepoint.formats import train_state
from savepoint.formats.hf import check_model_files, copy_model_files, unwrap_model
from savepoint.manifest import Manifest
from savepoint.saving import is_peft_model, rng_relbase, stateful_relbase


@dataclass(frozen=True)
class RestoreResult:
    """What `restore()` found. `step` is 0 and `path` None when there was nothing to restore."""

    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    path: str | None = None


def restore_local(
    path: str,
    manifest: Manifest,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    stateful: Mapping[str, Any] | None = None,
) -> RestoreResult:
    """Restore a one-process checkpoint into a plain process (`pipeline.restore_entry` picks this path)."""
    model = unwrap_model(model)
    stateful = dict(stateful or {})
    load_model = _plan_model_load(model, path, manifest)
    blobs = _read_blobs(path, manifest, optimizer=optimizer, scheduler=scheduler, stateful=stateful)
    optimizer_sd = None
    if optimizer is not None:
        optimizer_sd = train_state.prepare_optimizer_state(optimizer, model, blobs["optimizer"], path)
    check_blobs(path, blobs, scheduler=scheduler, stateful=stateful)

    # Everything is checked: from here on, state changes.
    apply_stateful(blobs, stateful)
    load_model()
    if optimizer is not None and optimizer_sd is not None:
        optimizer.load_state_dict(optimizer_sd)
    return finish_restore(path, manifest, blobs, scheduler=scheduler, stateful={})


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
    """Check the model files fit `model` now; return the function that loads them."""
    if manifest.kind == "adapter" or is_peft_model(model):
        if manifest.kind != "adapter" or not is_peft_model(model):
            raise IncompatibleCheckpointError(
                f"{path} holds a {'LoRA adapter' if manifest.kind == 'adapter' else 'full model'} but the model "
                f"given is {'not ' if manifest.kind == 'adapter' else ''}a peft PeftModel; restore into the same kind of model"
            )
        from savepoint.formats import peft as peft_format

        return peft_format.plan_adapter_load(model, path, manifest)
    files, targets = check_model_files(model, path, manifest)
    return lambda: copy_model_files(path, files, targets)
