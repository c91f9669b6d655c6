"""Rank helpers and the coordination a distributed save needs, on torch.distributed's own engine.

Everything works without torch.distributed: then this process is rank 0 of 1 and every collective
below is a no-op. Under `torchrun`, savepoint talks between ranks on a gloo group of its own, created
with a timeout (`SAVEPOINT_DIST_TIMEOUT` seconds, or the manager's `dist_timeout`): gloo works for CPU
objects whatever backend the training uses (NCCL included), and a dead or stuck rank then becomes an
error on every survivor instead of a hang.

    result = agree(error, payload, timeout=60.0, what="save of step 100")  # every rank, same order
"""

from __future__ import annotations

import atexit
import os
import traceback
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from savepoint.errors import SavepointError

DEFAULT_TIMEOUT = float(os.environ.get("SAVEPOINT_DIST_TIMEOUT", "600"))
_GROUPS: dict[float, Any] = {}
# id() of the default group the cached groups were made in: a job that destroys its process group and
# starts another must not reuse groups of the first (holding no reference to that default group).
_GROUPS_WORLD: list[int | None] = [None]


class DistributedSaveError(SavepointError):
    """A rank failed, died or timed out during a collective save; nothing was committed.

    `failed` maps each rank that reported an error to its message (empty when a rank vanished).
    """

    def __init__(self, message: str, *, failed: dict[int, str] | None = None) -> None:
        self.failed = dict(failed or {})
        super().__init__(message)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


# ---------------------------------------------------------------- what kind of model


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer under Accelerate's `AcceleratedOptimizer` (which keeps it in `.optimizer`)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def is_sharded(model: torch.nn.Module) -> bool:
    """True when some rank holds only part of the model: FSDP2 (`fully_shard`, DTensor) or FSDP1."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        return True
    return any(isinstance(p, DTensor) for p in model.parameters())


# ---------------------------------------------------------------- coordination


def coordination_group(timeout: float | None = None) -> Any:
    """savepoint's gloo group over all ranks, with `timeout` seconds on every collective (cached).

    Creating a group is itself collective: every rank must ask for the same timeout, in the same order.
    `timeout=None` reuses the group created first (a manager's `dist_timeout`), so that a restore or
    an export never builds a second group with the default timeout next to it.
    """
    if _GROUPS_WORLD[0] != id(dist.group.WORLD):
        _GROUPS.clear()
        _GROUPS_WORLD[0] = id(dist.group.WORLD)
    if timeout is None and _GROUPS:  # no timeout asked for: the group this job already uses
        return next(iter(_GROUPS.values()))
    seconds = float(timeout if timeout is not None else DEFAULT_TIMEOUT)
    if seconds <= 0:
        raise ValueError(f"the distributed timeout must be positive, got {seconds}")
    if seconds not in _GROUPS:
        # Never the training's own group, even where it would do: an async save's write and commit run
        # on a background thread while the training loop runs its collectives on that group.
        _GROUPS[seconds] = dist.new_group(backend="gloo", timeout=timedelta(seconds=seconds))
    return _GROUPS[seconds]


def _drop_groups() -> None:
    # Left to interpreter finalization, a gloo group's worker threads may still hold finished work whose
    # tensors need the GIL to free: a SIGABRT ("terminate called without an active exception") after
    # the job has finished. The groups savepoint created are shut down here, while the interpreter is
    # whole (a local operation for gloo); the job's own default group stays the job's to destroy.
    groups = [group for group in _GROUPS.values() if group is not dist.group.WORLD]
    _GROUPS.clear()
    if not dist.is_available() or not dist.is_initialized():
        return
    for group in groups:
        with suppress(Exception):  # already destroyed with the default group, or torch refused: nothing to do
            dist.destroy_process_group(group)


atexit.register(_drop_groups)


def agree(
    error: BaseException | None, payload: Any = None, *, timeout: float | None = None, what: str
) -> list[Any]:
    """Every rank reports whether its part of `what` succeeded; return every rank's payload.

    If any rank failed, that rank re-raises its own error and every other rank raises
    `DistributedSaveError` naming it; the same when a rank died or did not answer within `timeout`
    seconds. Payloads must be plain data (they travel through pickle between
    our own ranks, never through a file).
    """
    if not is_distributed():
        if error is not None:
            raise error
        return [payload]
    mine = (rank(), None, payload) if error is None else (rank(), describe_error(error), None)
    gathered: list[Any] = [None] * world_size()
    try:
        dist.all_gather_object(gathered, mine, group=coordination_group(timeout))
    except Exception as exc:  # gloo: a peer closed its connection (died) or the timeout passed
        raise DistributedSaveError(
            f"{what} failed: rank {rank()} lost contact with the other ranks within the timeout ({exc}). "
            "Another rank died or hangs; nothing was committed. Check the other ranks' logs.",
        ) from (error or exc)
    failed = {r: msg for r, msg, _ in gathered if msg is not None}
    if error is not None:
        raise error  # the failing rank raises its own error; the others learn about it below
    if failed:
        lines = "; ".join(f"rank {r}: {msg}" for r, msg in sorted(failed.items()))
        raise DistributedSaveError(
            f"{what} failed on {len(failed)} rank(s), nothing was committed: {lines}", failed=failed
        ) from error
    return [p for _, _, p in gathered]


def gather_to_rank0(
    error: BaseException | None, payload: Any = None, *, timeout: float | None = None, what: str
) -> list[Any] | None:
    """Like `agree`, but only rank 0 learns the payloads and who failed (a gather: O(W) on rank 0, not
    O(W) on every rank). Rank 0 returns every rank's payload, or raises as `agree` does; the other ranks
    return None, even when their own `error` is set: rank 0 tells them the outcome (`broadcast`), and
    they raise their own error after that.
    """
    if not is_distributed():
        if error is not None:
            raise error
        return [payload]
    mine = (rank(), None, payload) if error is None else (rank(), describe_error(error), None)
    gathered: list[Any] | None = [None] * world_size() if rank() == 0 else None
    try:
        dist.gather_object(mine, gathered, dst=0, group=coordination_group(timeout))
    except Exception as exc:  # gloo: a peer closed its connection (died) or the timeout passed
        raise DistributedSaveError(
            f"{what} failed: rank {rank()} lost contact with the other ranks within the timeout ({exc}). "
            "Another rank died or hangs; nothing was committed. Check the other ranks' logs.",
        ) from (error or exc)
    if gathered is None:
        return None
    failed = {r: msg for r, msg, _ in gathered if msg is not None}
    if error is not None:
        raise error
    if failed:
        lines = "; ".join(f"rank {r}: {msg}" for r, msg in sorted(failed.items()))
        raise DistributedSaveError(
            f"{what} failed on {len(failed)} rank(s), nothing was committed: {lines}", failed=failed
        )
    return [p for _, _, p in gathered]


@contextmanager
def peer_failures(what: str, during: str) -> Iterator[None]:
    """Torch's own collectives on the training's process group (the weight gather, FSDP1's state dict):
    a rank that dies there surfaces as the backend's RuntimeError on the survivors; raise it as the
    `DistributedSaveError` every other lost rank is."""
    try:
        yield
    except SavepointError:
        raise
    except Exception as exc:
        raise DistributedSaveError(
            f"{what} failed: rank {rank()} lost contact with the other ranks while {during} "
            f"({describe_error(exc)}). Another rank died or raised; nothing was committed. Check the other "
            "ranks' logs.",
        ) from exc


def describe_error(error: BaseException) -> str:
    last = traceback.extract_tb(error.__traceback__)[-1:] if error.__traceback__ else []
    where = f" (at {last[0].filename}:{last[0].lineno})" if last else ""
    return f"{type(error).__name__}: {error}{where}"


def broadcast(obj: Any, *, timeout: float | None = None, what: str) -> Any:
    """Rank 0's `obj` on every rank (plain data only)."""
    if not is_distributed():
        return obj
    box = [obj if rank() == 0 else None]
    try:
        dist.broadcast_object_list(box, src=0, group=coordination_group(timeout))
    except Exception as exc:
        raise DistributedSaveError(f"{what}: rank {rank()} lost contact with rank 0 ({exc})") from exc
    return box[0]


def on_rank0(fn: Any, *, timeout: float | None = None, what: str) -> Any:
    """Run `fn()` on rank 0 alone; its result on every rank, or its error raised on every rank."""
    result, error = None, None
    if rank() == 0:
        try:
            result = fn()
        except BaseException as exc:
            error = exc
    outcome = agree(error, result, timeout=timeout, what=what)
    return outcome[0]


# ---------------------------------------------------------------- gathering


def alias_names(model: torch.nn.Module) -> dict[str, str]:
    """name -> first name of the same parameter or buffer (tied weights), for names that alias another."""
    first: dict[int, str] = {}
    out = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        if id(tensor) in first:
            out[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return out


def full_model_state(model: torch.nn.Module, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The whole model's state dict, gathered to rank 0's CPU one tensor at a time (empty on other ranks).

    Collective for sharded models: every rank calls it. Tied weights are gathered once and alias the
    same tensor on rank 0, as they do in the live model, so peak host memory on rank 0 is the model
    once. FSDP2 (DTensor) models are gathered here tensor by tensor; FSDP1 through torch's
    `get_model_state_dict(full_state_dict=True, cpu_offload=True)`.
    """
    from torch.distributed.tensor import DTensor

    aliases = alias_names(model)
    if not any(isinstance(p, DTensor) for p in model.parameters()) and is_sharded(model):
        return _full_state_fsdp1(model, aliases, trainable_only)
    keep = {
        n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad or not trainable_only
    }
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name in aliases or (trainable_only and name not in keep):
            continue
        full = (
            tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        )  # collective, same order on all ranks
        if rank() == 0:
            out[name] = full.detach().cpu()
        del full
    if rank() == 0:
        out.update({name: out[target] for name, target in aliases.items() if target in out})
    return out


def _full_state_fsdp1(
    model: torch.nn.Module, aliases: dict[str, str], trainable_only: bool
) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # FSDP1 frees the unsharded storage a CPU "offload" copy still points to when the model already lives
    # on the CPU (torch 2.13: a crash); there the plain full gather is already on the CPU.
    offload = any(p.device.type != "cpu" for p in model.parameters())
    options = StateDictOptions(full_state_dict=True, cpu_offload=offload, ignore_frozen_params=trainable_only)
    state = get_model_state_dict(model, options=options)
    if rank() != 0:
        return {}
    state.update({name: state[target] for name, target in aliases.items() if target in state})
    return state  # type: ignore[return-value]  # full_state_dict: every value is a tensor
