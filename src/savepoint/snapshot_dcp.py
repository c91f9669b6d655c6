"""Host copies of a sharded model's DCP tensors (FSDP2's DTensors), for async saves under torchrun.

A DTensor's local shard is copied into the manager's reused host buffer pool (snapshot.py) and wrapped
again in a DTensor with the live one's mesh, placements and global shape and stride, so DCP's planner
sees exactly the layout it would have seen on the live state (the same chunks, offsets and metadata on
every rank), and the background write reads only the copy. Wrapping is metadata only: no collective,
no second copy.

    job.dcp_tensors[name] = host_copy(pool, f"dcp:{name}", tensor)

FSDP1's ShardedTensors are not copied (the manager saves FSDP1 models synchronously).
"""

from __future__ import annotations

from typing import Any

import torch

from savepoint.errors import SavepointError


def host_copy(pool: Any, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A host copy of one DCP tensor in `pool` (a `snapshot.HostBufferPool`): plain tensors as they are,
    DTensors as DTensors of the same layout over a host copy of their local shard."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        with torch.no_grad():
            local = pool.copy(name, tensor.to_local())
        return _as_dtensor(local, tensor)
    if not _is_plain(tensor):
        raise SavepointError(
            f"async_save cannot snapshot the DCP tensor {name!r} ({type(tensor).__name__}, e.g. an FSDP1 "
            "ShardedTensor): save this model with async_save=False."
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
