"""What one save holds, passed between the pipeline's two phases (pipeline/save.py): the request
(what `save()` was called with) and the job captured from it (this rank's tensors and small state,
taken on the training thread before anything is written; with a snapshot, host copies of them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from savepoint import distributed
from savepoint.manifest import Manifest, build_manifest

METRICS_NAME = "metrics.json"
Blobs = dict[str, tuple[bytes, dict[str, torch.Tensor]]]  # relpath without extension -> (JSON, tensors)


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
    parent: str | None = None  # the previous checkpoint's name (rank 0 only): the manifest's parent
    max_shard_size: int | str = "5GB"


@dataclass
class SaveJob:
    """This rank's part of one checkpoint, captured at `save()` time: the write phase reads only this,
    never the live model, optimizer or stateful objects (except the engine's own collective write)."""

    request: SaveRequest
    source: Any  # the pipeline.sources.ModelSource that writes the weights
    blobs: Blobs = field(default_factory=dict)  # RNG, stateful, scheduler, extra, optimizer (JSON part)
    model_state: dict[str, torch.Tensor] | None = None  # rank 0: the weights as written (gathered)
    adapter: Any = None  # a PeftModel: its adapters are written (config, base fingerprint)
    adapter_state: dict[str, dict[str, torch.Tensor]] | None = None  # rank 0: adapter name -> tensors
    dcp_tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # this rank's shards for DCP
    snapshot: bool = False  # async: tensors are copied to host memory and written in the background
    model_shards: dict[str, torch.Tensor] | None = None  # async FSDP2: gathered to rank 0 by the write phase
    timeout: float | None = None  # seconds each collective step may wait for the other ranks


def is_peft_model(model: torch.nn.Module) -> bool:
    try:
        from savepoint.formats import peft as peft_format
    except ImportError:
        return False
    return peft_format.is_peft_model(model)


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
