"""One save, in two phases: `capture` takes everything a checkpoint holds (consistent, no I/O), and
`write_checkpoint` turns it into files and commits them. An async save runs the second phase on a
background thread, on tensors the first phase copied to host memory.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from savepoint import distributed
from savepoint.discovery import step_dir_name
from savepoint.formats import stateful as stateful_format
from savepoint.formats import train_state
from savepoint.formats.hf import savable_state_dict, unwrap_model, write_model_files
from savepoint.formats.rank_state import rng_relbase as rng_relbase
from savepoint.formats.rank_state import stateful_relbase as stateful_relbase
from savepoint.manifest import Manifest, build_manifest
from savepoint.storage.dedupe import DedupingStagedDir
from savepoint.storage.local import StagedDir

METRICS_NAME = "metrics.json"
# rng_relbase and stateful_relbase are re-exported (`as`): restore code names blobs through this module.


@dataclass
class SaveRequest:
    root: str
    step: int
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    tokenizer: Any = None
    stateful: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    final: bool = False
    parent: str | None = None
    max_shard_size: int | str = "5GB"


@dataclass
class SaveJob:
    """Everything one checkpoint will hold, captured at `save()` time."""

    request: SaveRequest
    model_state: dict[str, torch.Tensor] | None
    # relative path without extension -> (JSON document, tensors it refers to)
    blobs: dict[str, tuple[bytes, dict[str, torch.Tensor]]]
    adapter: Any = None
    # adapter name -> tensors, taken at capture time (the writer never reads a live adapter)
    adapter_state: dict[str, dict[str, torch.Tensor]] | None = None


def capture(request: SaveRequest, *, snapshot: bool) -> SaveJob:
    """Take everything the checkpoint holds. With `snapshot`, tensors are copied so training may go on."""
    model = unwrap_model(request.model)
    blobs: dict[str, tuple[bytes, dict[str, torch.Tensor]]] = {}
    adapter = adapter_state = None
    model_state = None
    if is_peft_model(model):
        from savepoint.formats import peft as peft_format

        adapter, adapter_state = model, peft_format.adapter_states(model)
    else:
        model_state = savable_state_dict(model)
    ts = train_state.TRAIN_STATE_DIR
    if request.optimizer is not None:
        blobs[f"{ts}/optimizer"] = train_state.encode_blob(
            train_state.optimizer_state(request.optimizer, model), "optimizer"
        )
    if request.scheduler is not None:
        blobs[f"{ts}/scheduler"] = train_state.encode_blob(request.scheduler.state_dict(), "scheduler")
    for name, obj in request.stateful.items():
        blobs[stateful_relbase(name)] = train_state.encode_blob(
            stateful_format.capture(obj), f"stateful[{name!r}]"
        )
    blobs[rng_relbase(distributed.rank())] = train_state.encode_blob(train_state.rng_state(), "rng")
    if request.extra:
        blobs[f"{ts}/extra"] = train_state.encode_blob(request.extra, "extra")
    job = SaveJob(
        request=request, model_state=model_state, blobs=blobs, adapter=adapter, adapter_state=adapter_state
    )
    if snapshot:
        from savepoint.snapshot import snapshot_job

        snapshot_job(job)
    return job


def is_peft_model(model: torch.nn.Module) -> bool:
    try:
        from savepoint.formats import peft as peft_format
    except ImportError:
        return False
    return peft_format.is_peft_model(model)


def write_adapter(job: SaveJob, staged: StagedDir) -> dict[str, Any]:
    """The adapter files (and the merged model with `final`); returns the manifest's `base_model`."""
    from savepoint.formats import peft as peft_format

    base_model: dict[str, Any] = peft_format.write_adapter_files(
        job.adapter, staged, states=job.adapter_state
    )
    if job.request.tokenizer is not None:
        job.request.tokenizer.save_pretrained(staged.path)
        staged.record_unlisted()
    if job.request.final:
        from savepoint.lora.merge import merge_into_staged

        merge_into_staged(job.adapter, staged, subdir="merged")
    return base_model


def checkpoint_manifest(
    request: SaveRequest, kind: str, entries: Mapping[str, tuple[int, str]], base_model: dict[str, Any] | None
) -> Manifest:
    """The manifest of a training checkpoint: the request's step, metrics and parent over `entries`."""
    return build_manifest(kind, entries, **manifest_fields(request, base_model))


def manifest_fields(request: SaveRequest, base_model: dict[str, Any] | None) -> dict[str, Any]:
    """What a checkpoint's manifest says besides its files (the writer process builds it from these)."""
    return dict(
        step=request.step,
        metrics=request.metrics,
        parent=request.parent,
        base_model=base_model,
        world_size=distributed.world_size(),
    )


def stage_files(job: SaveJob, staged: StagedDir) -> tuple[str, dict[str, Any] | None]:
    """Write every file of the checkpoint into `staged`; return the manifest kind and base model.

    The writer process (async_save="process") passes a recording stand-in for `staged`."""
    request = job.request
    base_model = None
    if job.adapter is not None:
        base_model = write_adapter(job, staged)
        kind = "adapter"
    else:
        kind = write_model_files(
            request.model,
            staged,
            tokenizer=request.tokenizer,
            state=job.model_state,
            max_shard_size=request.max_shard_size,
        )
    for relbase, (doc, tensors) in job.blobs.items():
        train_state.write_blob(staged, relbase, doc, tensors)
    staged.write_bytes(METRICS_NAME, json.dumps({"step": request.step, **request.metrics}, indent=1).encode())
    return kind, base_model


def write_checkpoint(job: SaveJob) -> str:
    """Write, checksum and commit one checkpoint; on any failure nothing is left behind."""
    request = job.request
    # Files equal to the parent checkpoint's (frozen shards, tokenizer) become hardlinks.
    staged = DedupingStagedDir(request.root, step_dir_name(request.step), previous=request.parent)
    try:
        kind, base_model = stage_files(job, staged)
        manifest = checkpoint_manifest(request, kind, staged.entries, base_model)
        return staged.commit(manifest.to_json(), replace=True)
    except BaseException:
        staged.abort()
        raise
