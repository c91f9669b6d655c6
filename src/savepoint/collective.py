"""Restoring inside a `torchrun` job (or a plain process, from a checkpoint written at any world size).

The save side lives in savepoint/pipeline/ (save.py, staging.py, commit.py, sources.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from savepoint import distributed
from savepoint.distributed import DistributedSaveError, agree, is_sharded, rank, unwrap_optimizer
from savepoint.errors import IncompatibleCheckpointError
from savepoint.formats import hf, sharded, train_state
from savepoint.formats.rank_state import per_rank_stateful_relbase
from savepoint.manifest import Manifest, verify_files
from savepoint.pipeline.sources import unwrap_fsdp1 as _hf_model
from savepoint.saving import is_peft_model

_TS = train_state.TRAIN_STATE_DIR

# ---------------------------------------------------------------- restoring


def restore_collective(
    path: str,
    manifest: Manifest,
    *,
    model: torch.nn.Module,
    optimizer: Any = None,
    scheduler: Any = None,
    stateful: Mapping[str, Any] | None = None,
    timeout: float | None = None,
) -> Any:
    """Restore a checkpoint written at any world size into this rank (or a plain process).

    Checks first (files, keys, shapes; DCP tensors are read into fresh buffers), then changes state:
    stateful objects, the optimizer, the model (each rank keeps its shard), scheduler and RNG per rank.
    """
    from savepoint.integrations import deepspeed as ds
    from savepoint.restoring import apply_stateful, check_blobs, finish_restore

    if ds.is_engine(model):
        return ds.restore(
            path, manifest, engine=model, optimizer=optimizer, scheduler=scheduler, stateful=stateful
        )
    model = hf.unwrap_model(model)
    optimizer = unwrap_optimizer(optimizer) if optimizer is not None else None
    stateful = dict(stateful or {})
    _warn_world_size(path, manifest, stateful)
    # 1. What each rank can check alone: files, metadata, shapes, every blob. Then the ranks vote, so a
    # problem on one rank stops every rank before any of them enters a collective read.
    what = f"restore of {path}"
    error, blobs = None, {}
    model_step, optimizer_step = _ready(lambda: None), _ready(lambda: None)
    try:
        metadata = sharded.read_metadata(path, manifest) if sharded.has_dcp(manifest) else None
        model_step = _plan_model(model, path, manifest, metadata)
        blobs = _read_blobs(path, manifest, optimizer=optimizer, scheduler=scheduler, stateful=stateful)
        check_blobs(path, blobs, scheduler=scheduler, stateful=stateful)
        if optimizer is not None:
            optimizer_step = _plan_optimizer(model, optimizer, path, manifest, blobs, metadata)
    except BaseException as exc:
        error = exc
    try:
        agree(error, timeout=timeout, what=what)  # later collectives reuse this group (timeout=None)
    except DistributedSaveError as exc:
        if exc is error:
            raise
        lines = "; ".join(f"rank {r}: {m}" for r, m in sorted(exc.failed.items())) or str(exc)
        raise DistributedSaveError(
            f"{what} was refused, nothing was changed on any rank: {lines}", failed=exc.failed
        ) from exc
    # 2. Collective reads into fresh buffers (DCP raises on every rank); nothing live is changed yet:
    # the model's first, as the optimizer's step undoes its own initialisation when it fails.
    load_model = model_step.stage()
    load_optimizer = optimizer_step.stage()
    # 3. Everything is checked and read: from here on, state changes.
    apply_stateful(blobs, stateful)
    load_optimizer()  # before the model: it may hold views of the parameters
    load_model()
    return finish_restore(path, manifest, blobs, scheduler=scheduler, stateful={})


@dataclass(frozen=True)
class _Step:
    """One piece of a restore: `stage()` does its collective reads and returns the change to apply."""

    stage: Callable[[], Callable[[], object]]


def _ready(apply: Callable[[], object]) -> _Step:
    return _Step(stage=lambda: apply)


def _warn_world_size(path: str, manifest: Manifest, stateful: Mapping[str, Any]) -> None:
    now = distributed.world_size()
    if manifest.world_size == now or rank() != 0:
        return
    lost = (
        [f"RNG state of rank(s) {', '.join(map(str, range(now, manifest.world_size)))} is dropped"]
        if now < manifest.world_size
        else [
            f"ranks {manifest.world_size}..{now - 1} have no RNG state of their own and keep their current one"
        ]
    )
    if stateful and manifest.world_size > 1:
        lost.append(
            f"stateful objects ({', '.join(sorted(stateful))}) get their own rank's saved state where one "
            "exists, else rank 0's: data-loader positions do not match the new sharding of the data"
        )
    warnings.warn(
        f"{path} was saved by {manifest.world_size} rank(s) and is restored at {now}: model and optimizer state "
        f"are resharded exactly, but the continued run cannot be bit-identical: {'; '.join(lost)}",
        stacklevel=4,
    )


def _plan_model(model: torch.nn.Module, path: str, manifest: Manifest, metadata: Any) -> _Step:
    if manifest.kind == "adapter" or is_peft_model(model):
        from savepoint.lora.sharded import prime_fingerprint, uses_dtensor

        if (
            manifest.kind != "adapter"
            or not is_peft_model(model)
            or (is_sharded(model) and not uses_dtensor(model))
        ):
            raise IncompatibleCheckpointError(
                f"{path} holds a {'LoRA adapter' if manifest.kind == 'adapter' else 'full model'}: restore it into "
                f"{'a peft PeftModel (plain, DDP or FSDP2)' if manifest.kind == 'adapter' else 'a model that is no PeftModel'}"
            )
        from savepoint.formats import peft as peft_format

        def stage_adapter() -> Callable[[], object]:
            if is_sharded(model):  # collective: the full base's fingerprint, as a plain process computes it
                prime_fingerprint(model)
            # peft puts full adapter tensors into FSDP2's DTensor parameters itself (each rank its shard).
            return peft_format.plan_adapter_load(model, path, manifest)

        return _Step(stage=stage_adapter)
    if manifest.kind == "sharded":
        return _plan_model_from_dcp(model, path, manifest, metadata)
    if not is_sharded(model):
        files, targets = hf.check_model_files(model, path, manifest)
        return _ready(lambda: hf.copy_model_files(path, files, targets))
    files = hf.weight_files(path, manifest)
    verify_files(path, manifest, files)
    expected = _expected_shapes(model)
    layout, mismatches = hf.match_model_files(_hf_model(model), expected, hf.read_headers(path, files))
    if mismatches:
        raise IncompatibleCheckpointError(
            f"the model does not match checkpoint {path}; nothing was loaded:", mismatches=mismatches
        )
    return _ready(lambda: _load_full_files(model, path, files, layout))


def _plan_model_from_dcp(model: torch.nn.Module, path: str, manifest: Manifest, metadata: Any) -> _Step:
    """Check the stored shapes; the step reads this rank's shards into fresh buffers."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    stored = metadata.state_dict_metadata
    targets = sharded.model_tensors(model)
    problems = _shape_problems(stored, targets, "model")
    problems += [
        f"unexpected in checkpoint: {k}"
        for k in sorted(k for k in stored.keys() - targets.keys() if k.startswith(sharded.MODEL_PREFIX))
    ]
    if problems:
        raise IncompatibleCheckpointError(
            f"the model does not match checkpoint {path}; nothing was loaded:", mismatches=problems
        )

    def stage() -> Callable[[], object]:
        buffers = {k: torch.zeros_like(t) for k, t in targets.items()}  # a failed read changes no parameter
        sharded.read_dcp(path, manifest, buffers, metadata=metadata)  # collective
        prefix = len(sharded.MODEL_PREFIX)
        return lambda: set_model_state_dict(model, {k[prefix:]: v for k, v in buffers.items()})

    return _Step(stage=stage)


def _expected_shapes(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The savable names of a sharded model with their full shapes, as meta tensors."""
    meta = {
        n: torch.empty(tuple(t.shape), dtype=t.dtype, device="meta") for n, t in model.state_dict().items()
    }
    if hf.is_transformers_model(model):
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        return remove_tied_weights_from_state_dict(meta, model)  # type: ignore[arg-type]
    aliases = distributed.alias_names(model)
    return {n: t for n, t in meta.items() if n not in aliases}


def _load_full_files(model: torch.nn.Module, path: str, files: list[str], layout: Any = None) -> None:
    """Each rank reads the full weight files, one at a time (converted from the Hub's layout group by
    group where `layout` says so), and keeps its own shard of each tensor."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=True, strict=False)
    for part in hf.iter_model_parts(path, files, layout):
        set_model_state_dict(model, dict[str, Any](part), options=options)


def _read_blobs(
    path: str, manifest: Manifest, *, optimizer: Any, scheduler: Any, stateful: Mapping[str, Any]
) -> dict[str, Any]:
    from savepoint.saving import rng_relbase, stateful_relbase

    wanted: dict[str, str] = {}
    if optimizer is not None:
        wanted["optimizer"] = (
            sharded.GROUPS_BLOB if sharded.has_sharded_optimizer(manifest) else f"{_TS}/optimizer"
        )
    if scheduler is not None:
        wanted["scheduler"] = f"{_TS}/scheduler"
    for name in stateful:
        candidates = [
            per_rank_stateful_relbase(name, rank()),
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
    for key, relbase in {"extra": f"{_TS}/extra", "rng": rng_relbase(rank())}.items():
        if train_state.has_blob(manifest, relbase):
            wanted[key] = relbase
    return {key: train_state.read_blob(path, manifest, relbase) for key, relbase in wanted.items()}


def _plan_optimizer(
    model: torch.nn.Module,
    optimizer: Any,
    path: str,
    manifest: Manifest,
    blobs: dict[str, Any],
    metadata: Any,
) -> _Step:
    """Check the saved optimizer state against `optimizer`; the step reads its DCP tensors. Nothing
    about `optimizer` is left changed when a check or the read fails."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    saved = blobs["optimizer"]
    if not sharded.has_sharded_optimizer(manifest):
        if not is_sharded(model):
            prepared = train_state.prepare_optimizer_state(optimizer, model, saved, path)
            return _ready(lambda: optimizer.load_state_dict(prepared))
        # Saved unsharded (name-keyed, full tensors): torch shards it into this rank's optimizer.
        _check_groups(model, optimizer, saved, path)
        _check_moments(model, saved.get("state"), path)
        options = StateDictOptions(full_state_dict=True)
        return _ready(lambda: set_optimizer_state_dict(model, optimizer, saved, options=options))
    _check_groups(model, optimizer, saved, path)
    stored = metadata.state_dict_metadata
    moments = {
        k[len(sharded.OPTIM_PREFIX) :]: list(m.size)
        for k, m in stored.items()
        if k.startswith(sharded.OPTIM_PREFIX)
    }
    by_param: dict[str, dict[str, Any]] = {}
    for key, size in moments.items():
        name, _, state_key = key.rpartition(".")
        by_param.setdefault(name, {})[state_key] = torch.empty(size, device="meta")
    _check_moments(model, by_param, path)
    _check_moments(model, saved.get("state"), path)  # the JSON rest: names only

    def stage() -> Callable[[], object]:
        was_empty = not optimizer.state
        try:
            template = sharded.optimizer_state(model, optimizer)  # initialises empty state (zero-lr step)
            tensors, _ = sharded.split_optimizer_state(template)
            problems = _shape_problems(stored, tensors, "optimizer")
            if problems:
                raise IncompatibleCheckpointError(
                    f"the optimizer does not match checkpoint {path}:", mismatches=problems
                )
            buffers = {k: torch.zeros_like(t) for k, t in tensors.items()}
            sharded.read_dcp(path, manifest, buffers, metadata=metadata)  # collective
        except BaseException:
            if was_empty:
                optimizer.state.clear()  # undo the initialisation: the optimizer is as it was given
            raise
        joined = sharded.join_optimizer_state(template, buffers, saved)
        return lambda: set_optimizer_state_dict(model, optimizer, joined)

    return _Step(stage=stage)


def _check_groups(model: torch.nn.Module, optimizer: Any, saved: Any, path: str) -> None:
    current = [sorted(n) for n in _group_names(optimizer, model)]
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(groups, list) or current != [
        sorted(g.get("params", [])) if isinstance(g, dict) else None for g in groups
    ]:
        raise IncompatibleCheckpointError(
            f"the optimizer's parameters differ from those saved in {path}; nothing was loaded. Build the "
            "optimizer over the same parameters, in the same groups, as the run that saved it."
        )


def _check_moments(model: torch.nn.Module, state: Any, path: str) -> None:
    """Optimizer moments against the parameters' full shapes (DTensor or plain). FSDP1 exposes only
    flat local shards, so there the check is left to torch's resharding of the loaded state."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        return
    shapes = {_clean_name(n): tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    train_state.check_optimizer_moments(state, shapes, path)


def _group_names(optimizer: Any, model: torch.nn.Module) -> list[list[str]]:
    # FSDP1 (and activation checkpointing) insert wrapper modules; torch's state dicts drop their names.
    names = {id(p): _clean_name(n) for n, p in model.named_parameters(remove_duplicate=False)}
    return [[names.get(id(p), "?") for p in g["params"]] for g in optimizer.param_groups]


def _clean_name(name: str) -> str:
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        name = name.replace(wrapper, "")
    return name


def _shape_problems(stored: Any, tensors: Mapping[str, torch.Tensor], what: str) -> list[str]:
    """What DCP metadata `stored` lacks of `tensors`, or holds in another shape."""
    problems = [f"missing in checkpoint: {k}" for k in sorted(tensors.keys() - stored.keys())]
    problems += [
        f"shape of {k}: checkpoint {list(stored[k].size)}, {what} {list(t.shape)}"
        for k, t in tensors.items()
        if k in stored and list(stored[k].size) != list(t.shape)
    ]
    return problems
