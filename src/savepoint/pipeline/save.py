"""Every save, at every world size: one process is the case W = 1 of the same code. Two phases:

    capture (save() time, on the training thread)                               `capture`
      gather             the model source's weights into the job (FSDP / ZeRO-3 gather to rank 0: collective;
                         an async FSDP2 save keeps each rank's shards, gathered by the write phase)
      small state        this rank's RNG and stateful objects (user code runs), the optimizer's parts
                         (DCP tensors when sharded; on rank 0 its name-keyed JSON), scheduler and extra;
                         with `snapshot`, host copies of every tensor (async saves); then a vote, so
                         nobody enters a collective write after a rank failed
    write + commit (now, or on the async writer)                                `write_checkpoint`
      open the temp dir  rank 0 creates it; every rank proves it sees it        (pipeline/staging.py)
                         (at W = 1 its files are hard-linked to the parent checkpoint's when unchanged)
      write              each rank writes and hashes its own files: DCP shards (optimizer, and the
                         model with sharded_model), DeepSpeed partitions, RNG and stateful blobs; rank 0
                         the weights or adapter, the optimizer's small part, metrics.json  (`write_files`)
      report + commit    a gather of votes and (path, size, checksum) lists; rank 0 stats, writes the
                         manifest, renames, and broadcasts the outcome               (pipeline/commit.py)

At W = 1 every vote, gather and broadcast returns at once (distributed.py). The writer process of
`async_save="process"` runs `write_files` against a recorder (async_writer.py) and commits the bytes.

What each rank writes into the one temporary directory:

    rank 0       config.json, model*.safetensors (the full state dict, gathered to its CPU),
                 tokenizer files, metrics.json, train_state/{scheduler,extra,optimizer_groups}.json,
                 train_state/dcp/.metadata, then savepoint.json (the manifest) and the rename
    every rank   train_state/dcp/__<rank>_0.distcp (its optimizer shards, written in parallel through
                 DCP; never gathered), train_state/rng/rank-<rank>.*, train_state/stateful/rank-<rank>/*
                 (train_state/stateful/NAME at W = 1)

A rank that raises or dies makes every other rank raise within the timeout; rank 0 removes the
temporary directory, and the previous checkpoint is untouched. Retention runs in the manager, after
the commit, on rank 0.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from savepoint import distributed
from savepoint.discovery import step_dir_name
from savepoint.distributed import agree, is_sharded, rank, unwrap_optimizer
from savepoint.formats import hf, sharded, train_state
from savepoint.formats import stateful as stateful_format
from savepoint.formats.rank_state import TS, per_rank_stateful_relbase, rng_relbase, stateful_relbase
from savepoint.manifest import build_manifest
from savepoint.pipeline.commit import commit
from savepoint.pipeline.job import METRICS_NAME, Blobs, SaveJob, SaveRequest
from savepoint.pipeline.sources import gather_for_export, savable, source_for
from savepoint.pipeline.staging import open_staged
from savepoint.snapshot import snapshot_job
from savepoint.storage.local import StagedDir


def capture(
    request: SaveRequest, *, snapshot: bool = False, timeout: float | None = None, sharded_model: bool = False
) -> SaveJob:
    """Take this rank's part of the checkpoint. With `snapshot`, tensors are copied to host memory so
    training may go on while the job is written. Collective: every rank calls it."""
    what = f"save of step {request.step} under {request.root}"
    source = source_for(request.model, sharded_model=sharded_model)
    source.check(request)  # the same verdict on every rank, before anything collective
    job = SaveJob(request=request, source=source, timeout=timeout, snapshot=snapshot)
    with distributed.peer_failures(what, "gathering the weights to rank 0"):
        source.gather(job)  # collective
    optimizer = None if source.owns_optimizer else request.optimizer
    opt_tensors, opt_rest = (
        optimizer_parts(source.module, optimizer) if optimizer is not None else (None, None)
    )
    error = None
    try:
        job.blobs = capture_rank_state(request)
        if optimizer is not None and rank() == 0:
            relbase = sharded.GROUPS_BLOB if opt_tensors is not None else f"{TS}/optimizer"
            job.blobs[relbase] = train_state.encode_blob(opt_rest, "optimizer")
        job.dcp_tensors = {**source.shard_tensors(), **(opt_tensors or {})}
        if snapshot:
            snapshot_job(job)
    except BaseException as exc:
        error = exc
    agree(error, timeout=timeout, what=what)  # nobody enters a collective write after a rank failed
    return job


def write_checkpoint(job: SaveJob) -> str:
    """Write this rank's files of `job` (hashed while written), report them, and commit on rank 0; on
    any failure on any rank nothing is committed and the temp dir is removed. Collective."""
    request = job.request
    what = f"save of step {request.step} under {request.root}"
    # One process: files equal to the parent checkpoint's (frozen shards, tokenizer) become hardlinks.
    previous = request.parent if distributed.world_size() == 1 else None
    staged = open_staged(
        request.root, step_dir_name(request.step), previous=previous, timeout=job.timeout, what=what
    )
    try:
        error, kind, base_model = None, job.source.describe(), None
        try:
            kind, base_model = write_files(job, staged)
        except BaseException as exc:
            error = exc
        return commit(staged, error, request, kind, base_model, timeout=job.timeout, what=what)
    except BaseException:
        if rank() == 0:
            staged.abort()
        raise


def write_files(job: SaveJob, staged: StagedDir) -> tuple[str, dict[str, Any] | None]:
    """Write this rank's files of `job` into `staged`; return the manifest kind and base model.

    The writer process (async_save="process") passes a recording stand-in for `staged`."""
    request, source = job.request, job.source
    if job.dcp_tensors:
        sharded.write_dcp(staged, job.dcp_tensors, timeout=job.timeout)  # collective; DCP raises on all ranks
    source.finish_gather(job)  # collective: an async FSDP2 save's weights to rank 0, on savepoint's group
    source.write_all_ranks(staged, request)  # collective
    base_model = None
    if rank() == 0:
        base_model = source.write_rank0(staged, job)
        metrics = {"step": request.step, **request.metrics}
        staged.write_bytes(METRICS_NAME, json.dumps(metrics, indent=1).encode())
    for relbase, (doc, tensors) in job.blobs.items():
        train_state.write_blob(staged, relbase, doc, tensors)
    return source.describe(), base_model


def capture_rank_state(request: SaveRequest) -> Blobs:
    """This rank's small state (user code runs here): RNG and stateful objects; on rank 0 also scheduler/extra."""
    many = distributed.world_size() > 1
    blobs = {rng_relbase(rank()): train_state.encode_blob(train_state.rng_state(), "rng")}
    for name, obj in request.stateful.items():
        relbase = per_rank_stateful_relbase(name, rank()) if many else stateful_relbase(name)
        blobs[relbase] = train_state.encode_blob(stateful_format.capture(obj), f"stateful[{name!r}]")
    if rank() == 0:
        if request.scheduler is not None:
            blobs[f"{TS}/scheduler"] = train_state.encode_blob(request.scheduler.state_dict(), "scheduler")
        if request.extra:
            blobs[f"{TS}/extra"] = train_state.encode_blob(request.extra, "extra")
    return blobs


def optimizer_parts(model: torch.nn.Module, optimizer: Any) -> tuple[dict[str, torch.Tensor] | None, Any]:
    """(DCP tensors, JSON rest) for sharded models; (None, name-keyed blob state) for replicated ones."""
    optimizer = unwrap_optimizer(optimizer)
    if is_sharded(model):
        tensors, rest = sharded.split_optimizer_state(sharded.optimizer_state(model, optimizer))
        return tensors, rest
    return None, train_state.optimizer_state(optimizer, model) if rank() == 0 else None


def save_pretrained_collective(
    model: torch.nn.Module, out: str, *, timeout: float | None = None, **options: Any
) -> str:
    """`save_pretrained` under torchrun: the full state dict is gathered to rank 0's CPU, rank 0 writes."""
    with distributed.peer_failures(f"save_pretrained to {out}", "gathering the weights to rank 0"):
        module, full = gather_for_export(model)  # collective

    def write() -> str:
        staged = StagedDir(os.path.dirname(out), os.path.basename(out))
        try:
            state = savable(module, full) if full is not None else None
            kind = hf.write_model_files(module, staged, state=state, **options)
            manifest = build_manifest("export" if kind == "model" else kind, staged.entries)
            return staged.commit(manifest.to_json(), replace=True)
        except BaseException:
            staged.abort()
            raise

    return distributed.on_rank0(write, timeout=timeout, what=f"save_pretrained to {out}")
