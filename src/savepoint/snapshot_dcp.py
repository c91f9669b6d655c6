"""Host copies of a sharded model's DCP tensors, for async saves under torchrun: FSDP2's DTensors, and
FSDP1's ShardedTensors (or DTensors, when FSDP1 was given a `device_mesh=`).

A sharded tensor's local shards are copied into the manager's reused host buffer pool (snapshot.py)
and wrapped again in a tensor of the same kind and global layout (a DTensor with the live one's mesh,
placements and global shape and stride; a ShardedTensor with the live one's shard offsets, sizes and
owning ranks), so DCP's planner sees exactly the layout it would have seen on the live state (the same
chunks, offsets and metadata on every rank), and the background write reads only the copy. Wrapping
is metadata only: no collective, no second copy.

    job.dcp_tensors[name] = host_copy(pool, f"dcp:{name}", tensor)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from savepoint.errors import SavepointError


def host_copy(pool: Any, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A host copy of one DCP tensor in `pool` (a `snapshot.HostBufferPool`): plain tensors as they are,
    DTensors and ShardedTensors as tensors of the same kind and layout over host copies of their local
    shards."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        with torch.no_grad():
            local = pool.copy(name, tensor.to_local())
        return _as_dtensor(local, tensor)
    if isinstance(tensor, ShardedTensor):
        with torch.no_grad():
            copies = [pool.copy(f"{name}#{i}", shard.tensor) for i, shard in enumerate(tensor.local_shards())]
        return _as_sharded_tensor(copies, tensor)
    if not _is_plain(tensor):
        raise SavepointError(
            f"async_save cannot snapshot the DCP tensor {name!r} ({type(tensor).__name__}): save this "
            "model with async_save=False."
        )
    return pool.copy(name, tensor)


def _is_plain(tensor: torch.Tensor) -> bool:
    return type(tensor) is torch.Tensor or isinstance(tensor, torch.nn.Parameter)


def _as_dtensor(local: torch.Tensor, like: Any) -> torch.Tensor:
    """A DTensor over the host tensor `local` with `like`'s mesh, placements, shape and stride."""
    from torch.distributed.tensor import DTensor

    mesh = like.device_mesh
    if mesh.device_type == local.device.type:  # a CPU mesh (gloo): the public constructor does it
        return DTensor.from_local(
            local, mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
        )
    # A device mesh (CUDA): `from_local` would move the host copy back to the device, and the public
    # `DTensor.to("cpu")` allocates fresh, unpinned memory on every save. torch's own async staging
    # (DCP's `_create_cpu_state_dict`) keeps the mesh and swaps in a host local tensor; the DTensor
    # constructor with the live tensor's spec does the same over our pooled (pinned) buffer. Private
    # API, isolated here: the spec carries mesh, placements and global shape/stride unchanged.
    # Not run in our tests (no GPU): the CPU branch above is.
    return DTensor(local, like._spec, requires_grad=False)


def _as_sharded_tensor(copies: list[torch.Tensor], like: Any) -> torch.Tensor:
    """A ShardedTensor over the host tensors `copies` (one per local shard of `like`, in order), with
    `like`'s global size and every rank's shard offsets and sizes.

    torch's public constructors either gather every rank's shard metadata (`init_from_local_shards`: a
    collective on the training's group, at save() time) or allocate fresh storage (`.to("cpu")`, DCP's
    `_create_cpu_state_dict` staging). The metadata is already known on every rank, so we rebuild it
    and call the private constructor torch's own staging relies on, which takes local shards plus global
    metadata without communicating. Placements keep their rank and name the copy's device (the host),
    and the properties say what the copies are (not pinned unless the pool pinned them, no grad),
    because that constructor checks each local shard against them.
    """
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor

    live = like.metadata()
    device = copies[0].device if copies else torch.device("cpu")
    pinned = bool(copies) and copies[0].is_pinned()
    shards_metadata = [
        ShardMetadata(list(m.shard_offsets), list(m.shard_sizes), f"rank:{m.placement.rank()}/{device}")
        for m in live.shards_metadata
    ]
    properties = dataclasses.replace(live.tensor_properties, requires_grad=False, pin_memory=pinned)
    metadata = dataclasses.replace(live, shards_metadata=shards_metadata, tensor_properties=properties)
    by_offsets = {tuple(m.shard_offsets): m for m in shards_metadata}
    local = [
        Shard(copy, by_offsets[tuple(shard.metadata.shard_offsets)])
        for copy, shard in zip(copies, like.local_shards(), strict=True)
    ]
    return ShardedTensor._init_from_local_shards_and_global_metadata(
        local, metadata, process_group=like._process_group
    )
