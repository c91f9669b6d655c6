"""Restoring from an object-store root under torchrun: each rank downloads only what it reads.

    every rank   the manifest, the model files (config, weights, tokenizer: every rank loads full
                 files), rank 0's small train state (scheduler, extra, optimizer groups), DCP's
                 `.metadata`; its own RNG and stateful files (rank 0's where it has none of its own);
                 and the `.distcp` files holding the chunks its shards overlap, as DCP's own load
                 planner computes them from `.metadata` and this rank's DTensors
    left out     the other ranks' RNG and stateful files and the `.distcp` files it reads nothing from

The downloaded files are checked against the manifest in the restore's own reads, which decode and
hash each byte once, before the ranks vote (`restore_collective`); hashing them here as well would read
every byte twice. The files left in the store are marked on the local copy
(`storage.remote.partial_copy`), so the DCP reader does not look for them. Where the plan cannot be computed (a model whose parameters are not
DTensors named as DCP names them, FSDP1's flat parameters) a rank downloads every `.distcp` file:
more bytes, never a missing one.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from typing import Any

import torch

from savepoint.errors import SavepointError
from savepoint.formats import dcp_ranges, sharded
from savepoint.manifest import Manifest, check_file, parse_manifest
from savepoint.storage.local import MANIFEST_NAME
from savepoint.storage.remote import RemoteRoot, cache_dir, partial_copy

_RNG_FILE = re.compile(r"train_state/rng/rank-(\d+)\.")
_STATEFUL_FILE = re.compile(r"train_state/stateful/rank-(\d+)/(.+)\.(json|safetensors)$")


@contextlib.contextmanager
def rank_copy(remote: RemoteRoot, step_url: str, *, rank: int, model: Any, optimizer: Any) -> Iterator[str]:
    """Download this rank's part of a checkpoint into a temporary directory; yield its path, then
    remove it. The restore checks each file as it reads it."""
    os.makedirs(cache_dir(), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="savepoint-fetch-", dir=cache_dir()) as tmp:
        name = remote.name_of(step_url)
        raw = remote.manifest_bytes(name)
        manifest = parse_manifest(raw, step_url)  # refuses paths that climb out of the checkpoint
        local = os.path.join(tmp, name)
        wanted = [rel for rel in sorted(manifest.files) if reads_outside_dcp(manifest, rel, rank)]
        remote.fetch(name, manifest, wanted, local)
        if sharded.has_dcp(manifest):
            wanted += dcp_files_read(remote, name, manifest, local, model=model, optimizer=optimizer)
        with open(os.path.join(local, MANIFEST_NAME), "wb") as f:
            f.write(raw)
        with partial_copy(local, frozenset(manifest.files) - set(wanted)):
            yield local


def reads_outside_dcp(manifest: Manifest, relpath: str, rank: int) -> bool:
    """Whether this rank reads `relpath` (DCP's `.metadata` yes, its data files are decided by the plan)."""
    if relpath.startswith(sharded.DCP_DIR + "/"):
        return relpath == sharded.METADATA
    if relpath.startswith(dcp_ranges.RANGES_DIR + "/"):
        return False  # the item checksums of the data files this rank reads: decided with them
    if match := _RNG_FILE.match(relpath):
        return int(match.group(1)) == rank
    if match := _STATEFUL_FILE.match(relpath):
        owner, name = int(match.group(1)), match.group(2)
        if owner == rank:
            return True
        # Restore falls back to rank 0's state where this rank saved none (the world grew).
        return owner == 0 and f"train_state/stateful/rank-{rank:05d}/{name}.json" not in manifest.files
    return True


def dcp_files_read(
    remote: RemoteRoot, name: str, manifest: Manifest, local: str, *, model: Any, optimizer: Any
) -> list[str]:
    """Download the `.distcp` files this rank's load plan reads (every one when no plan can be made)."""
    every = [p for p in sharded.dcp_files(manifest) if p != sharded.METADATA]
    try:
        planned = _planned_files(manifest, local, model, optimizer)
    except (SavepointError, OSError, ValueError, KeyError, RuntimeError, TypeError):
        planned = None  # a bad `.metadata` is reported by the restore itself, by name
    chosen = every if planned is None else [p for p in every if p.rsplit("/", 1)[-1] in planned]
    chosen += sorted({r for p in chosen if (r := dcp_ranges.record_of(p)) in manifest.files})
    remote.fetch(name, manifest, chosen, local)
    return chosen


def _planned_files(manifest: Manifest, local: str, model: Any, optimizer: Any) -> set[str] | None:
    """The data files DCP's load planner reads for this rank's tensors, or None when it cannot tell."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.tensor import DTensor

    from savepoint.formats.dcp_reader import read_dcp_metadata

    if check_file(local, sharded.METADATA, manifest.files[sharded.METADATA]) is not None:
        return None
    sizes = {p[len(sharded.DCP_DIR) + 1 :]: manifest.files[p].size for p in sharded.dcp_files(manifest)}
    metadata = read_dcp_metadata(local, sharded.DCP_DIR, sizes)
    live = _live_tensors(model)
    if not any(isinstance(t, DTensor) for t in live.values()):
        return None  # every rank holds whole tensors: it reads every chunk
    targets: dict[str, torch.Tensor] = {}
    for key, stored in metadata.state_dict_metadata.items():
        if not isinstance(stored, TensorStorageMetadata):
            continue
        if key.startswith(sharded.MODEL_PREFIX):
            if manifest.kind != "sharded":
                continue
            fqn = key[len(sharded.MODEL_PREFIX) :]
        elif key.startswith(sharded.OPTIM_PREFIX):
            if optimizer is None:
                continue
            fqn = key[len(sharded.OPTIM_PREFIX) :].rpartition(".")[0]
        else:
            continue
        mine = live.get(fqn)
        # A moment has its parameter's shape and sharding; anything else (a scalar step) is read whole.
        if isinstance(mine, DTensor) and list(mine.shape) == list(stored.size):
            targets[key] = mine
        else:
            targets[key] = torch.empty(tuple(stored.size), dtype=stored.properties.dtype, device="meta")
    planner = DefaultLoadPlanner(allow_partial_load=True)
    planner.set_up_planner(targets, metadata, is_coordinator=False)
    plan = planner.create_local_plan()
    return {metadata.storage_data[item.storage_index].relative_path for item in plan.items}


def _live_tensors(model: Any) -> dict[str, torch.Tensor]:
    """Parameters and buffers by name, without a state_dict() call (collective for FSDP1)."""
    module = getattr(model, "module", model)  # DDP, DeepSpeed engines
    if not isinstance(module, torch.nn.Module):
        return {}
    return {**dict(module.named_buffers()), **dict(module.named_parameters())}
