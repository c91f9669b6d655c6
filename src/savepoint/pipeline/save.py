"""A save inside a `torchrun` job (or a plain process: world size 1): every rank calls the same API,
savepoint decides who writes what, and nothing is committed unless every rank wrote its part.

    open the temp dir    rank 0 creates it; every rank proves it sees it        (pipeline/staging.py)
    capture              this rank's small state: RNG, stateful objects (user code runs), on rank 0
                         scheduler and extra; then a vote, so nobody enters a collective after a failure
    gather               the model source's collective step (FSDP / ZeRO-3 gathers to rank 0)
    write                each rank writes and hashes its own files: DCP shards (optimizer, and the
                         model with sharded_model), DeepSpeed partitions, RNG and stateful blobs; rank 0
                         the weights or adapter, the optimizer's small part, metrics.json
    report + commit      a gather of votes and (path, size, checksum) lists; rank 0 stats, writes the
                         manifest, renames, and broadcasts the outcome               (pipeline/commit.py)

What each rank writes into the one temporary directory:

    rank 0       config.json, model*.safetensors (the full state dict, gathered to its CPU),
                 tokenizer files, metrics.json, train_state/{scheduler,extra,optimizer_groups}.json,
                 train_state/dcp/.metadata, then savepoint.json (the manifest) and the rename
    every rank   train_state/dcp/__<rank>_0.distcp (its optimizer shards, written in parallel through
                 DCP; never gathered), train_state/rng/rank-<rank>.*, train_state/stateful/rank-<rank>/*

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
from savepoint.pipeline.sources import gather_for_export, savable, source_for
from savepoint.pipeline.staging import open_staged
from savepoint.storage.local import StagedDir


def save_collective(request: Any, *, timeout: float | None = None, sharded_model: bool = False) -> str:
    """Write checkpoint `request.step` from every rank; rank 0 commits once all ranks wrote their part.

    With `sharded_model` (and a sharded model) the weights go into the DCP directory as each rank's
    shards instead of being gathered to rank 0; the manifest's kind is then "sharded".
    """
    what = f"save of step {request.step} under {request.root}"
    source = source_for(request.model, sharded_model=sharded_model)
    source.check(request)  # the same verdict on every rank, before anything collective
    optimizer = None if source.owns_optimizer else request.optimizer
    staged = open_staged(request.root, step_dir_name(request.step), timeout=timeout, what=what)
    try:
        blobs, error = {}, None
        try:
            blobs = capture_rank_state(request)
        except BaseException as exc:
            error = exc
        agree(error, timeout=timeout, what=what)  # nobody enters a collective after a rank failed
        with distributed.peer_failures(what, "gathering the weights to rank 0"):
            source.gather()  # collective
        opt_tensors, opt_rest = (None, None)
        if optimizer is not None:
            opt_tensors, opt_rest = optimizer_parts(source.module, optimizer)
        dcp_tensors = {**source.shard_tensors(), **(opt_tensors or {})}
        error, base_model = None, None
        try:
            if dcp_tensors:
                sharded.write_dcp(staged, dcp_tensors, timeout=timeout)  # collective; DCP raises on all ranks
            source.write_all_ranks(staged, request)  # collective
            if rank() == 0:
                base_model = source.write_rank0(staged, request)
                if optimizer is not None:
                    relbase = sharded.GROUPS_BLOB if opt_tensors is not None else f"{TS}/optimizer"
                    train_state.write_blob(staged, relbase, *train_state.encode_blob(opt_rest, "optimizer"))
                metrics = {"step": request.step, **request.metrics}
                staged.write_bytes("metrics.json", json.dumps(metrics, indent=1).encode())
            for relbase, (doc, tensors) in blobs.items():
                train_state.write_blob(staged, relbase, doc, tensors)
        except BaseException as exc:
            error = exc
        return commit(staged, error, request, source.describe(), base_model, timeout=timeout, what=what)
    except BaseException:
        if rank() == 0:
            staged.abort()
        raise


def capture_rank_state(request: Any) -> dict[str, tuple[bytes, dict[str, torch.Tensor]]]:
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
