"""Planning an optimizer's restore under torchrun: check the saved groups and moments against the
live optimizer, read the DCP moments (each item checked as it is read) into fresh buffers, and hand
back the step that loads them. Nothing about the optimizer is left changed when a check or a read fails.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from savepoint.distributed import is_sharded
from savepoint.errors import IncompatibleCheckpointError
from savepoint.formats import sharded, train_state
from savepoint.manifest import Manifest
from savepoint.restore_model import Step, ready, shape_problems


def plan_optimizer(
    model: torch.nn.Module,
    optimizer: Any,
    path: str,
    manifest: Manifest,
    blobs: dict[str, Any],
    metadata: Any,
) -> Step:
    """Check the saved optimizer state against `optimizer`; the step reads its DCP tensors."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    saved = blobs["optimizer"]
    if not sharded.has_sharded_optimizer(manifest):
        if not is_sharded(model):
            prepared = train_state.prepare_optimizer_state(optimizer, model, saved, path)
            return ready(lambda: optimizer.load_state_dict(prepared))
        # Saved unsharded (name-keyed, full tensors): torch shards it into this rank's optimizer.
        _check_groups(model, optimizer, saved, path)
        _check_moments(model, saved.get("state"), path)
        options = StateDictOptions(full_state_dict=True)
        return ready(lambda: set_optimizer_state_dict(model, optimizer, saved, options=options))
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
            problems = shape_problems(stored, tensors, "optimizer")
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

    return Step(stage=stage)


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
