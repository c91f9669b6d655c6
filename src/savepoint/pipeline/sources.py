"""Where a save's model state comes from: one small interface over every kind of model, picked by
`source_for`. The save pipeline (pipeline/save.py) calls the same steps on each, in the same order, on
every rank:

    describe()                   the manifest's kind ("model", "module", "sharded", "adapter")
    check(request)               refusals that need no collective, the same verdict on every rank
    gather(job)                  the weights into the job, at save() time: rank 0's state dict (FSDP and
                                 ZeRO-3 gather it there: collective) or the adapters' tensors; an async
                                 FSDP2 save keeps each rank's shards instead (`job.model_shards`); a
                                 DeepSpeed engine's own checkpoint files, taken unwritten (collective)
    finish_gather(job)           write phase: those shards gathered to rank 0 on savepoint's group
    shard_tensors()              this rank's weight shards for the DCP directory ({} when gathered)
    write_all_ranks(staged, rq)  writes of every rank (DeepSpeed's own partition files, taken by gather)
    write_rank0(staged, job)     rank 0's weight files from the job; returns the manifest's `base_model`

    ModuleSource        plain module, DDP, FSDP1/FSDP2 gathered to rank 0    "model" or "module"
    ShardedSource       FSDP1/FSDP2 stored as each rank's shards (DCP)       "sharded"
    AdapterSource       a peft PeftModel (plain, DDP or FSDP2)                "adapter"
    EngineSource        a DeepSpeed engine (ZeRO 1-3)                         "model" or "module"

Integrations sit below this module: it imports them, never the reverse.
"""

from __future__ import annotations

from typing import Any

import torch

from savepoint import distributed
from savepoint.distributed import is_sharded
from savepoint.errors import UnsupportedStateError
from savepoint.formats import hf, sharded
from savepoint.integrations import deepspeed as ds
from savepoint.pipeline.job import SaveJob, is_peft_model
from savepoint.shard_gather import deferrable, gather_rows
from savepoint.storage.local import StagedDir


class ModelSource:
    """The default of every step is to do nothing; a source overrides what its kind of model needs."""

    owns_optimizer = False  # True when the model saves its optimizer itself (a DeepSpeed engine)

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module  # what optimizer state is keyed by (parameter names)

    def describe(self) -> str:
        return "module"

    def check(self, request: Any) -> None:
        pass

    def gather(self, job: SaveJob) -> None:
        pass

    def shard_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def finish_gather(self, job: SaveJob) -> None:
        pass

    def write_all_ranks(self, staged: StagedDir, request: Any) -> None:
        pass

    def write_rank0(self, staged: StagedDir, job: SaveJob) -> dict[str, Any] | None:
        raise NotImplementedError


def source_for(model: torch.nn.Module, *, sharded_model: bool = False) -> ModelSource:
    """The source for `model` as passed to `save()`. `sharded_model` stores a sharded model's weights as
    each rank's shards; adapters are small and always gathered."""
    if ds.is_engine(model):
        return EngineSource(model)
    module = hf.unwrap_model(model)
    if is_peft_model(module):
        return AdapterSource(module)
    if sharded_model and is_sharded(module):
        return ShardedSource(module)
    return ModuleSource(module)


def is_collective(model: torch.nn.Module) -> bool:
    """Whether saving `model` takes every rank (a process group is up, the model is sharded, or it is a
    DeepSpeed engine, which always saves through its own collective checkpoint)."""
    return (
        (distributed.is_distributed() and distributed.world_size() > 1)
        or is_sharded(model)
        or ds.is_engine(model)
    )


def has_fsdp1(model: torch.nn.Module) -> bool:
    """True when `model` holds an FSDP1 (`FullyShardedDataParallel`) wrapper anywhere."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


class ModuleSource(ModelSource):
    """A whole module on rank 0: as it is (plain, DDP), or gathered there from FSDP1/FSDP2 shards."""

    def describe(self) -> str:
        return "model" if hf.is_transformers_model(unwrap_fsdp1(self.module)) else "module"

    def gather(self, job: SaveJob) -> None:
        if is_sharded(self.module):
            if job.snapshot and not has_fsdp1(self.module):
                # Async FSDP2: save() copies each rank's shards; the write phase gathers them to rank 0
                # on savepoint's own group (`finish_gather`), off the training loop's time. Async FSDP1
                # gathers here, as a synchronous save does (its state_dict() is that collective), and
                # the snapshot copies rank 0's gathered state.
                job.model_shards = deferrable(self.module)
                if job.model_shards is not None:
                    return
            full = distributed.full_model_state(self.module)  # collective
            if distributed.rank() == 0:
                job.model_state = savable(unwrap_fsdp1(self.module), full)
        elif distributed.rank() == 0:
            job.model_state = hf.savable_state_dict(self.module)

    def finish_gather(self, job: SaveJob) -> None:
        if job.model_shards is None:
            return
        what = f"save of step {job.request.step} under {job.request.root}"
        full = gather_rows(job.model_shards, timeout=job.timeout, what=what)  # collective
        job.model_shards = None
        if distributed.rank() == 0:  # tied weights alias one tensor again, as `full_model_state` returns them
            aliases = distributed.alias_names(self.module)
            full.update({name: full[target] for name, target in aliases.items() if target in full})
            job.model_state = savable(self.module, full)

    def write_rank0(self, staged: StagedDir, job: SaveJob) -> dict[str, Any] | None:
        request = job.request
        hf.write_model_files(
            unwrap_fsdp1(self.module),
            staged,
            tokenizer=request.tokenizer,
            state=job.model_state,
            max_shard_size=request.max_shard_size,
        )
        return None


class ShardedSource(ModelSource):
    """Each rank's weight shards go into the DCP directory; rank 0 writes config and tokenizer only, for
    `savepoint consolidate` to complete."""

    def describe(self) -> str:
        return "sharded"

    def shard_tensors(self) -> dict[str, torch.Tensor]:
        return sharded.model_tensors(self.module)

    def write_rank0(self, staged: StagedDir, job: SaveJob) -> dict[str, Any] | None:
        request = job.request
        if hf.is_transformers_model(self.module):
            hf.write_config(self.module, staged, None)
        if request.tokenizer is not None:
            request.tokenizer.save_pretrained(staged.path)
        staged.record_unlisted()
        return None


class AdapterSource(ModelSource):
    """A peft model's adapters (never the base). Sharded (FSDP2): gathered to rank 0, with the full base's
    fingerprint computed collectively."""

    def describe(self) -> str:
        return "adapter"

    def check(self, request: Any) -> None:
        if not is_sharded(self.module):
            return
        from savepoint.lora.sharded import uses_dtensor

        if not uses_dtensor(self.module):
            raise UnsupportedStateError(
                "saving the LoRA adapter of an FSDP1 (FullyShardedDataParallel) model is not supported; shard the "
                "PeftModel with FSDP2 (`fully_shard`) or wrap it with DDP instead (adapters are small)"
            )
        if request.final:
            raise UnsupportedStateError(
                "final=True (merging the adapter into the base) is not supported for a sharded model: save without "
                "final=True, then run `savepoint merge-lora CKPT --base BASE_DIR --out OUT` on one machine"
            )

    def gather(self, job: SaveJob) -> None:
        job.adapter = self.module
        if is_sharded(self.module):  # collective: the adapter to rank 0, the full base's fingerprint
            from savepoint.lora.sharded import gather_adapter_states, prime_fingerprint

            prime_fingerprint(self.module)
            job.adapter_state = gather_adapter_states(self.module)
        elif distributed.rank() == 0:
            from savepoint.formats import peft as peft_format

            job.adapter_state = peft_format.adapter_states(self.module)

    def write_rank0(self, staged: StagedDir, job: SaveJob) -> dict[str, Any] | None:
        return write_adapter(job, staged)


class EngineSource(ModelSource):
    """A DeepSpeed engine: its own checkpoint (every rank its partition, the optimizer included) under
    train_state/deepspeed/, plus the 16-bit weights gathered to rank 0 as a transformers directory.

    Both are taken at save() time (DeepSpeed's collectives run there, on the training's group); with an
    async save the 16-bit weights (the live parameters under ZeRO-1/2) are copied by `snapshot_job` and
    the engine's files into host buffers as DeepSpeed hands them over. The write phase only writes."""

    owns_optimizer = True

    def __init__(self, engine: Any) -> None:
        super().__init__(engine.module)
        self.engine = engine
        self.engine_files: Any = None  # this rank's files of the engine's checkpoint, taken by gather

    def describe(self) -> str:
        return "model" if hf.is_transformers_model(self.engine.module) else "module"

    def check(self, request: Any) -> None:
        if request.optimizer is not None and request.optimizer is not self.engine.optimizer:
            raise UnsupportedStateError(
                "with a DeepSpeed engine, pass model=engine and no optimizer= (or engine.optimizer): the engine "
                "saves and restores its own optimizer"
            )

    def gather(self, job: SaveJob) -> None:
        full = ds.full_state(self.engine)  # collective
        if distributed.rank() == 0:
            job.model_state = savable(self.engine.module, full or {})
        request = job.request
        what = f"save of step {request.step} under {request.root}"
        with distributed.peer_failures(what, "in the engine's save_checkpoint"):  # its own barriers
            self.engine_files = ds.capture_engine_checkpoint(  # writes nothing
                self.engine, request.step, root=request.root, snapshot=job.snapshot
            )

    def write_all_ranks(self, staged: StagedDir, request: Any) -> None:
        ds.write_engine_checkpoint(self.engine_files, staged)  # this rank's files only: no collective
        self.engine_files = None

    def write_rank0(self, staged: StagedDir, job: SaveJob) -> dict[str, Any] | None:
        tokenizer, state = job.request.tokenizer, job.model_state
        hf.write_model_files(self.engine.module, staged, tokenizer=tokenizer, state=state)
        return None


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


# ---------------------------------------------------------------- helpers (also for export and restore)


def unwrap_fsdp1(model: torch.nn.Module) -> torch.nn.Module:
    """The user's model inside an FSDP1 root wrapper, for config and tied-weight names: torch's full state
    dict of FSDP1 already has the wrapper's `_fsdp_wrapped_module.` prefixes removed, and nothing here may
    call the wrapper's own state_dict() on rank 0 alone (it is collective)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    while isinstance(model, FullyShardedDataParallel):
        model = model.module
    return model


def savable(model: torch.nn.Module, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A gathered full state dict as it goes on disk: tied weights once, named as transformers expects."""
    if hf.is_transformers_model(model):
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        return remove_tied_weights_from_state_dict(full, model)  # type: ignore[arg-type]
    return hf.drop_aliases(full)[0]


def gather_for_export(model: torch.nn.Module) -> tuple[torch.nn.Module, dict[str, torch.Tensor] | None]:
    """(the module to write, its full state on rank 0 or None when the module on rank 0 is whole).
    Collective: every rank calls it."""
    if ds.is_engine(model):
        return unwrap_fsdp1(model.module), ds.full_state(model)  # type: ignore[arg-type]  # ZeRO-3 gathers
    inner = hf.unwrap_model(model)
    if is_sharded(inner):
        return unwrap_fsdp1(inner), distributed.full_model_state(inner)
    return inner, None
