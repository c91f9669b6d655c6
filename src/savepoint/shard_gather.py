"""An FSDP2 model's weights gathered to rank 0 in the write phase of an async save, on savepoint's own
coordination group (never the training's): `save()` then returns after copying each rank's shards,
instead of after a gather on the training's process group.

    shards = deferrable(module)                  # save() time: None when the layout is not plain FSDP2
    full = gather_rows(host_copies_of_shards, timeout=..., what=...)   # background: rank 0 gets the whole

Plain FSDP2 shards every parameter along dim 0 over a 1-D mesh of all ranks, in rank order, the way
`torch.chunk` splits it (rank r holds rows [r*c, (r+1)*c) with c = ceil(n / W), the last ranks fewer or
none). Each tensor is gathered padded to c rows and trimmed on rank 0. Other layouts (HSDP's 2-D
meshes, other placements) are gathered at save() time as before.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from savepoint import distributed
from savepoint.distributed import DistributedSaveError, alias_names


def deferrable(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The model's state (its DTensor shards, tied weights once) if every sharded entry is plain FSDP2
    (Shard(0) over a 1-D mesh of all ranks in order); None when it must be gathered now."""
    from torch.distributed.tensor import DTensor, Shard

    aliases = alias_names(model)
    state = {name: t for name, t in model.state_dict().items() if name not in aliases}
    everyone = list(range(distributed.world_size()))
    for tensor in state.values():
        if isinstance(tensor, DTensor):
            mesh = tensor.device_mesh
            if mesh.ndim != 1 or tuple(tensor.placements) != (Shard(0),) or mesh.mesh.tolist() != everyone:
                return None
    return state


def gather_rows(
    shards: dict[str, torch.Tensor], *, timeout: float | None, what: str
) -> dict[str, torch.Tensor]:
    """Every DTensor of `shards` whole on rank 0 (plain tensors are rank 0's own); {} on other ranks.
    Collective on the coordination group: every rank calls it with the same names in the same order."""
    from torch.distributed.tensor import DTensor

    group = distributed.coordination_group(timeout)
    me, world = distributed.rank(), distributed.world_size()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in shards.items():
        if not isinstance(tensor, DTensor):
            if me == 0:
                out[name] = tensor
            continue
        n = tensor.shape[0]
        per_rank = -(-n // world)
        local = tensor.to_local()
        padded = local.new_zeros((per_rank, *tensor.shape[1:]))
        padded[: local.shape[0]] = local
        flat = padded.reshape(-1).view(torch.uint8)  # bytes: any dtype travels through gloo
        received = [torch.empty_like(flat) for _ in range(world)] if me == 0 else None
        try:
            dist.gather(flat, received, dst=0, group=group)
        except Exception as exc:  # gloo: a peer died, or the timeout passed
            raise DistributedSaveError(
                f"{what} failed: rank {me} lost contact with the other ranks while gathering {name} to rank 0 "
                f"({distributed.describe_error(exc)}); nothing was committed."
            ) from exc
        if received is not None:
            rows = [b.view(local.dtype).reshape(per_rank, *tensor.shape[1:]) for b in received]
            out[name] = torch.cat(rows)[:n].reshape(tensor.shape)
    return out
