"""Sharded training state: a DCP directory inside the checkpoint, written by every rank in parallel.

    train_state/dcp/.metadata          torch's index of every chunk (a pickle: read only through
                                       savepoint's allow-list reader, formats/dcp_metadata.py)
    train_state/dcp/__0_0.distcp ...   each rank's own chunks, raw tensor bytes
    train_state/optimizer_groups.json  param_groups and non-tensor optimizer state, keyed by name

Only tensors go through DCP (keys `optim.<param fqn>.<state key>`, and `model.<fqn>` when the model
itself is stored sharded), so the `.distcp` files hold only tensor records (decoded by DCP with
torch's weights-only unpickler), never byte items. Optimizer state is keyed
by parameter name (torch's `get_optimizer_state_dict`), exactly like the non-sharded blob, so a
checkpoint written by N ranks loads at M ranks, or in a plain process without torch.distributed:
DCP reshards on load.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch

from savepoint import distributed
from savepoint.errors import CorruptCheckpointError, Problem
from savepoint.formats import train_state
from savepoint.formats.dcp_ranges import RangeRecordingWriter, RangeRecords, has_range_records, record_files
from savepoint.manifest import Manifest, verify_files
from savepoint.storage.local import StagedDir
from savepoint.storage.remote import left_in_store
from savepoint.verified_read import read_bytes_verified

DCP_DIR = f"{train_state.TRAIN_STATE_DIR}/dcp"
METADATA = f"{DCP_DIR}/.metadata"
GROUPS_BLOB = f"{train_state.TRAIN_STATE_DIR}/optimizer_groups"
MODEL_PREFIX = "model."
OPTIM_PREFIX = "optim."


def has_dcp(manifest: Manifest) -> bool:
    return METADATA in manifest.files


def has_sharded_optimizer(manifest: Manifest) -> bool:
    return has_dcp(manifest) and train_state.has_blob(manifest, GROUPS_BLOB)


def dcp_files(manifest: Manifest) -> list[str]:
    return sorted(p for p in manifest.files if p.startswith(DCP_DIR + "/"))


# ---------------------------------------------------------------- optimizer state <-> tensors + JSON


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state keyed by parameter name; sharded tensors stay sharded (DTensor)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer)


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state as DCP keys (`model.<fqn>`); each rank holds only its shards (DTensor)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return {f"{MODEL_PREFIX}{k}": v for k, v in get_model_state_dict(model).items()}  # type: ignore[misc]


def split_optimizer_state(osd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors for DCP, the rest for JSON): the rest holds param_groups and non-tensor state values."""
    tensors: dict[str, torch.Tensor] = {}
    rest: dict[str, dict[str, Any]] = {}
    for fqn, entry in osd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{OPTIM_PREFIX}{fqn}.{key}"] = value
            else:
                rest.setdefault(fqn, {})[key] = value
    return tensors, {"state": rest, "param_groups": osd["param_groups"]}


def join_optimizer_state(
    template: dict[str, Any], loaded: dict[str, torch.Tensor], rest: dict[str, Any]
) -> dict[str, Any]:
    """Put DCP-loaded tensors and the JSON part back together into what `set_optimizer_state_dict` takes."""
    state: dict[str, dict[str, Any]] = {}
    for fqn, entry in template["state"].items():
        state[fqn] = {k: loaded.get(f"{OPTIM_PREFIX}{fqn}.{k}", v) for k, v in entry.items()}
        state[fqn].update(rest["state"].get(fqn, {}))
    return {"state": state, "param_groups": rest["param_groups"]}


# ---------------------------------------------------------------- writing


_DCP_RANK_FILE = re.compile(r"__(\d+)_\d+\.distcp$")


def write_dcp(staged: StagedDir, tensors: dict[str, torch.Tensor], *, timeout: float | None) -> None:
    """Write `tensors` (this rank's shards) into `staged`'s DCP directory; record this rank's files.

    Collective: every rank calls it, with the same keys. DCP runs its planning on savepoint's gloo
    group, so an error on one rank is raised on all of them.
    """
    import torch.distributed.checkpoint as dcp

    path = staged.abspath(DCP_DIR)
    os.makedirs(path, exist_ok=True)
    writer = RangeRecordingWriter(path, sync_files=True)
    if distributed.is_distributed():
        # Replicated tensors (AdamW's scalar steps) go to rank 0's file, not spread over every rank's: a
        # rank restoring from an object store then downloads its own file and rank 0's, not all of them.
        planner = dcp.DefaultSavePlanner(dedup_save_to_lowest_rank=True)
        group = distributed.coordination_group(timeout)
        dcp.save(tensors, storage_writer=writer, planner=planner, process_group=group)
    else:
        dcp.save(tensors, storage_writer=writer, no_dist=True)
    # FileSystemWriter names each rank's files `__<rank>_<n>.distcp`: each rank hashes its own, so rank 0
    # never reads another rank's shards. Rank 0 takes every file that names no rank (`.metadata`); a
    # file of another layout is refused at commit rather than read there.
    # Each item's checksum is taken in the same read (`dcp_ranges`): a rank restoring at another world
    # size reads only some items, and checks those.
    me = distributed.rank()
    mine = []
    for name in sorted(os.listdir(path)):
        owner = _DCP_RANK_FILE.match(name)
        if (int(owner.group(1)) if owner else 0) == me:
            mine.append(name)
    record_files(staged, DCP_DIR, mine, writer.items, me)


# ---------------------------------------------------------------- reading


def read_dcp(
    ckpt_dir: str,
    manifest: Manifest,
    targets: dict[str, torch.Tensor],
    *,
    metadata: Any = None,
    timeout: float | None = None,
) -> int:
    """Load checkpointed tensors into `targets` in place (plain tensors or DTensors: DCP reshards).

    Each item read is checked against its recorded checksum as it is read (checkpoints without item
    records had every DCP file verified whole by `read_metadata`). Returns the data bytes read
    (0 for such older checkpoints). `metadata`: what `read_metadata` returned; else it is read here.
    """
    from savepoint.formats.dcp_reader import load_tensors

    if metadata is None:
        metadata = read_metadata(ckpt_dir, manifest)
    group = distributed.coordination_group(timeout) if distributed.is_distributed() else None
    ranges = RangeRecords(ckpt_dir, manifest, DCP_DIR) if has_range_records(manifest) else None
    return load_tensors(
        os.path.join(ckpt_dir, DCP_DIR),
        metadata,
        targets,
        checkpoint=ckpt_dir,
        process_group=group,
        ranges=ranges,
    )


def read_metadata(ckpt_dir: str, manifest: Manifest) -> Any:
    """torch's DCP `Metadata` of a checkpoint: `.metadata` checked against the manifest as it is read,
    through the allow-list (never `pickle.load`), its entries confined to the listed data files.

    Data files are checked item by item as they are read (`read_dcp`), where the checkpoint records
    item checksums; in older checkpoints every DCP file is verified whole here, first."""
    from savepoint.formats.dcp_metadata import MAX_METADATA_BYTES, parse_metadata

    if not has_dcp(manifest):
        raise CorruptCheckpointError(
            ckpt_dir, [Problem(METADATA, "needed for sharded state but not in the manifest")]
        )
    files = dcp_files(manifest)
    if not has_range_records(manifest):  # older checkpoints: whole files first, then DCP reads ranges
        left = left_in_store(ckpt_dir)  # a rank's partial copy of an object-store checkpoint: not its shards
        verify_files(ckpt_dir, manifest, [p for p in files if p != METADATA and p not in left])
    raw = read_bytes_verified(ckpt_dir, manifest, METADATA, max_bytes=MAX_METADATA_BYTES)
    sizes = {p[len(DCP_DIR) + 1 :]: manifest.files[p].size for p in files if p != METADATA}
    return parse_metadata(raw, sizes, checkpoint=ckpt_dir, relpath=METADATA)
