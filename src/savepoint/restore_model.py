"""Planning a model's restore: check the stored weights fit the model, read them (checked as they are
read) into buffers of their own, and hand back the step that changes the live model.

    step = plan_model(model, path, manifest, dcp_metadata)   # checks; nothing read into the model
    apply = step.stage()                                     # collective reads (DCP), fresh buffers
    apply()                                                  # the live model changes

Weight files of a plain model are read once, into fresh buffers, and copied in only after every file
matched its checksum (`verified_read`): a second read of each file to verify it first costs more than
holding the weights once on the host, as the DCP path already does. An FSDP2 model restored from full
weight files reads each file once too, and keeps only this rank's shard of each tensor (1/W of the
model) until the apply. FSDP1's flat shards are filled by torch from full tensors as they stream in,
which would change the model before the last file is read: there the files are verified first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from savepoint import distributed
from savepoint.distributed import is_sharded
from savepoint.errors import IncompatibleCheckpointError
from savepoint.formats import hf, sharded
from savepoint.manifest import Manifest, verify_files
from savepoint.pipeline.job import is_peft_model
from savepoint.verified_read import read_safetensors_verified


@dataclass(frozen=True)
class Step:
    """One piece of a restore: `stage()` does its (collective) reads and returns the change to apply."""

    stage: Callable[[], Callable[[], object]]


def ready(apply: Callable[[], object]) -> Step:
    return Step(stage=lambda: apply)


def plan_model_files(
    model: torch.nn.Module, path: str, manifest: Manifest, prefix: str = ""
) -> Callable[[], None]:
    """Read a plain model's weight files once, each checked against the manifest as it is read, and
    check they fit `model`; return the function that copies them in."""
    files = hf.weight_files(path, manifest, prefix)
    model = hf.unwrap_model(model)
    expected = hf.savable_state_dict(model)
    layout, mismatches = hf.match_model_files(model, expected, hf.read_headers(path, files))
    if mismatches:
        # Only the headers were read: a damaged header reads as another model. Damage comes first.
        verify_files(path, manifest, files)
        raise IncompatibleCheckpointError(
            f"the model does not match checkpoint {path}; nothing was loaded. Build the model with the "
            "checkpoint's config (config.json), or restore into the architecture it was saved from:",
            mismatches=mismatches,
        )
    loaded = {rel: read_safetensors_verified(path, manifest, rel) for rel in files}
    targets = hf.ModelTargets(expected, layout)
    return lambda: hf.copy_model_files(path, files, targets, read=loaded.pop)


def plan_model(model: torch.nn.Module, path: str, manifest: Manifest, metadata: Any) -> Step:
    """The model's part of a collective restore (any wrapping: plain, DDP, FSDP1/2, PEFT)."""
    if manifest.kind == "adapter" or is_peft_model(model):
        return _plan_adapter(model, path, manifest)
    if manifest.kind == "sharded":
        return _plan_model_from_dcp(model, path, manifest, metadata)
    if not is_sharded(model):
        return ready(plan_model_files(model, path, manifest))
    files = hf.weight_files(path, manifest)
    expected = _expected_shapes(model)
    layout, mismatches = hf.match_model_files(fsdp_inner(model), expected, hf.read_headers(path, files))
    if mismatches:
        verify_files(path, manifest, files)  # a damaged header reads as another model: damage first
        raise IncompatibleCheckpointError(
            f"the model does not match checkpoint {path}; nothing was loaded:", mismatches=mismatches
        )
    if _is_fsdp1(model):  # flat shards: streamed in through torch, verified first (module docstring)
        verify_files(path, manifest, files)
        return ready(lambda: _load_full_files(model, path, files, layout))
    shards = _read_local_shards(model, path, manifest, files, layout)
    return ready(lambda: _apply_local_shards(model, shards))


def _plan_adapter(model: torch.nn.Module, path: str, manifest: Manifest) -> Step:
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

    return Step(stage=stage_adapter)


def _plan_model_from_dcp(model: torch.nn.Module, path: str, manifest: Manifest, metadata: Any) -> Step:
    """Check the stored shapes; the step reads this rank's shards into fresh buffers."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    stored = metadata.state_dict_metadata
    targets = sharded.model_tensors(model)
    problems = shape_problems(stored, targets, "model")
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
        sharded.read_dcp(path, manifest, buffers, metadata=metadata)  # collective, items checked as read
        prefix = len(sharded.MODEL_PREFIX)
        return lambda: set_model_state_dict(model, {k[prefix:]: v for k, v in buffers.items()})

    return Step(stage=stage)


def fsdp_inner(model: torch.nn.Module) -> torch.nn.Module:
    """The user's model inside FSDP1 root wrappers (for config and tied-weight names)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    while isinstance(model, FullyShardedDataParallel):
        model = model.module
    return model


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


def _is_fsdp1(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def _read_local_shards(
    model: torch.nn.Module, path: str, manifest: Manifest, files: list[str], layout: Any
) -> dict[str, torch.Tensor]:
    """This rank's shard of every tensor in the full weight files (FSDP2: DTensor parameters), read file
    by file, each file checked in its one read; only the shards are kept. No communication: every rank
    cuts its own shard out of the full tensor it read."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    targets = model.state_dict()
    shards: dict[str, torch.Tensor] = {}

    def read(rel: str) -> dict[str, torch.Tensor]:
        return read_safetensors_verified(path, manifest, rel)

    for part in hf.iter_model_parts(path, files, layout, read=read):
        for name, full in part.items():
            target = targets.get(name)
            if target is None:
                raise IncompatibleCheckpointError(
                    f"{path} holds {name}, which the model lacks; nothing was loaded"
                )
            if isinstance(target, DTensor):
                cut = distribute_tensor(
                    full.to(target.device), target.device_mesh, target.placements, src_data_rank=None
                )
                shards[name] = DTensor.from_local(
                    cut.to_local().clone(),  # its own memory: the full tensor is dropped
                    target.device_mesh,
                    target.placements,
                    run_check=False,
                    shape=cut.shape,
                    stride=cut.stride(),
                )
            else:
                shards[name] = full.to(target.device)
    return shards


def _apply_local_shards(model: torch.nn.Module, shards: dict[str, torch.Tensor]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    # strict=False: tied weights are stored once, under the name the files use
    set_model_state_dict(model, dict[str, Any](shards), options=StateDictOptions(strict=False))


def _load_full_files(model: torch.nn.Module, path: str, files: list[str], layout: Any = None) -> None:
    """Each rank reads the full weight files, one at a time (converted from the Hub's layout group by
    group where `layout` says so), and keeps its own shard of each tensor."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=True, strict=False)
    for part in hf.iter_model_parts(path, files, layout):
        set_model_state_dict(model, dict[str, Any](part), options=options)


def shape_problems(stored: Any, tensors: Mapping[str, torch.Tensor], what: str) -> list[str]:
    """What DCP metadata `stored` lacks of `tensors`, or holds in another shape."""
    problems = [f"missing in checkpoint: {k}" for k in sorted(tensors.keys() - stored.keys())]
    problems += [
        f"shape of {k}: checkpoint {list(stored[k].size)}, {what} {list(t.shape)}"
        for k, t in tensors.items()
        if k in stored and list(stored[k].size) != list(t.shape)
    ]
    return problems
