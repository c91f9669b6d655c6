"""DeepSpeed ZeRO engines (stages 1-3): the same `CheckpointManager` API, with `model=engine`.

    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, config=ds_config, ...)
    mgr.restore(model=engine)                    # every rank; the engine's optimizer and scheduler come back
    mgr.save(step, model=engine, tokenizer=tok)  # every rank; pass the engine, not engine.module

The engine owns its optimizer (and the scheduler it was given), so `optimizer=` is not needed; a
scheduler or `stateful=` objects the engine does not know about are saved by savepoint as usual.

What a checkpoint holds, inside savepoint's usual atomic commit (temp dir, every rank's vote, manifest
over every file written last, rename):

    config.json, model*.safetensors     the 16-bit weights gathered to rank 0 (ZeRO-3 through the
                                        engine's `_zero3_consolidated_16bit_state_dict`): a transformers
                                        directory, as for any other model
    train_state/deepspeed/global_stepN/ the engine's own `save_checkpoint` layout, every rank its own
                                        partition (fp32 master weights, optimizer moments, scheduler)
    train_state/rng/, stateful/ ...     as for any distributed save

save() runs the engine's `save_checkpoint` with savepoint's own checkpoint engine swapped in, which
records each file's state instead of writing it (deepspeed_snapshot.py): DeepSpeed's collectives run
at save() time, on the training thread; the files are written, byte for byte what DeepSpeed would have
written, by the write phase. With `async_save=True` the state is first copied into reused host
buffers and the write and commit run in the background, as for any other model.

The files under `train_state/deepspeed/` are DeepSpeed's own format: torch pickles, the one exception
to "no pickle in what we write" besides DCP's metadata. They are read only after every one of them
matched its checksum in the manifest, only if the manifest lists them, and only through torch's
`weights_only` unpickler (deepspeed_files.py); DeepSpeed routes that would call plain `torch.load`
(universal checkpoints, NVMe optimizer offload) are refused. Restore needs the world size it was
saved at; `savepoint consolidate` turns such a directory (or any DeepSpeed checkpoint directory) into
an HF model directory offline, through the same reader.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from savepoint import distributed
from savepoint.errors import (
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    Problem,
    UnsafeCheckpointError,
    UnsupportedStateError,
)
from savepoint.formats import train_state
from savepoint.formats.rank_state import read_rank_blobs
from savepoint.integrations.deepspeed_files import (
    FileLoader,
    engine_reads_through,
    module_reads_through,
    refuse_unsafe_options,
)
from savepoint.io.files import read_bytes_inside
from savepoint.manifest import Manifest, verify_files

DS_DIR = f"{train_state.TRAIN_STATE_DIR}/deepspeed"
_RANK_FILE = re.compile(r"(?:^|_)pp_rank_(\d+)_")


def is_engine(model: object) -> bool:
    """True for a DeepSpeed engine (checked without importing deepspeed when it is not loaded)."""
    ds = sys.modules.get("deepspeed")
    return ds is not None and isinstance(model, ds.DeepSpeedEngine)


def tag_of(step: int) -> str:
    return f"global_step{step}"


# ---------------------------------------------------------------- saving


def full_state(engine: Any) -> dict[str, torch.Tensor]:
    """The 16-bit weights on rank 0's CPU ({} elsewhere). Collective: every rank calls it.

    Under ZeRO-1/2 these are the live (replicated) parameters, not copies: write them before training on."""
    if engine.zero_optimization_partition_weights():  # ZeRO-3: gathered one module at a time
        state = engine._zero3_consolidated_16bit_state_dict()
        return dict(state) if distributed.rank() == 0 else {}
    if distributed.rank() != 0:
        return {}
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}  # ZeRO-1/2: replicated


def capture_engine_checkpoint(engine: Any, step: int, *, root: str, snapshot: bool) -> Any:
    """This rank's files of the engine's own checkpoint for `step`, taken now and written by
    `write_engine_checkpoint` (deepspeed_snapshot.py). With `snapshot` every tensor is copied into host
    buffers reused per checkpoint `root`, so training may go on before they are written. Collective
    (DeepSpeed's own barriers); the save pipeline calls it through `pipeline.sources.EngineSource`."""
    from savepoint.integrations.deepspeed_snapshot import capture_engine_files, engine_pool

    return capture_engine_files(engine, tag_of(step), pool=engine_pool(root) if snapshot else None)


def write_engine_checkpoint(files: Any, staged: Any) -> None:
    """Write and record (hash) the files `capture_engine_checkpoint` took, under train_state/deepspeed/."""
    from savepoint.integrations.deepspeed_snapshot import write_engine_files

    write_engine_files(files, staged, DS_DIR)


def _file_rank(name: str) -> int | None:
    """The data-parallel rank a DeepSpeed file belongs to; None for files every rank reads."""
    match = _RANK_FILE.search(name)
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------- restoring


def has_engine_state(manifest: Manifest) -> bool:
    return any(p.startswith(DS_DIR + "/") for p in manifest.files)


def restore(
    path: str,
    manifest: Manifest,
    *,
    engine: Any,
    optimizer: Any = None,
    scheduler: Any = None,
    stateful: Mapping[str, Any] | None = None,
) -> Any:
    """Restore a DeepSpeed checkpoint into `engine` at the world size it was saved at.

    Before the engine changes: every DeepSpeed file verified, this rank's files decoded (weights-only,
    memory-mapped), the small state checked. What DeepSpeed then checks while loading is its own."""
    from savepoint.restore_state import check_blobs, finish_restore

    if optimizer is not None and optimizer is not engine.optimizer:
        raise UnsupportedStateError("with a DeepSpeed engine, restore(model=engine) without optimizer=")
    if not has_engine_state(manifest):
        raise IncompatibleCheckpointError(
            f"{path} holds no DeepSpeed engine state (it was not saved from a DeepSpeed engine); load its "
            "model files into engine.module before deepspeed.initialize instead"
        )
    if manifest.world_size != distributed.world_size():
        raise IncompatibleCheckpointError(
            f"{path} was saved by {manifest.world_size} DeepSpeed rank(s) and this job has "
            f"{distributed.world_size()}: a DeepSpeed engine restores at the same world size (its partitions are "
            "per rank). Restore with the same number of ranks, or consolidate it and start from the weights."
        )
    tag = tag_of(manifest.step or 0)
    stateful = dict(stateful or {})
    error, blobs, loader = None, {}, None
    try:
        refuse_unsafe_options(engine, path)
        files = sorted(p for p in manifest.files if p.startswith(f"{DS_DIR}/{tag}/"))
        if not files:
            raise CorruptCheckpointError(
                path, [Problem(f"{DS_DIR}/{tag}", "no DeepSpeed files for this step")]
            )
        verify_files(path, manifest, files)  # every pickle matches its checksum before any is opened
        blobs = read_rank_blobs(
            path, manifest, rank=distributed.rank(), optimizer=None, scheduler=scheduler, stateful=stateful
        )
        check_blobs(path, blobs, scheduler=scheduler, stateful=stateful)
        names = [f.rsplit("/", 1)[1] for f in files]
        loader = FileLoader(os.path.join(path, DS_DIR, tag), listed=names, checkpoint=path)
        # Decode this rank's files (weights-only, memory-mapped) before the engine changes at all.
        loader.preload([n for n in names if _file_rank(n) in (None, distributed.rank())])
    except BaseException as exc:
        error = exc
    # Every rank learns of a problem on any rank before one of them enters DeepSpeed's collectives.
    distributed.agree(error, timeout=None, what=f"restore of {path}")
    assert loader is not None
    with engine_reads_through(engine, loader):
        loaded, _ = engine.load_checkpoint(
            os.path.join(path, DS_DIR), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    if loaded is None:
        raise CorruptCheckpointError(path, [Problem(f"{DS_DIR}/{tag}", "DeepSpeed could not load it")])
    return finish_restore(path, manifest, blobs, scheduler=scheduler, stateful=stateful)


# ---------------------------------------------------------------- consolidating (offline, one process)


def find_checkpoint(source: str) -> str | None:
    """The `global_stepN` directory of a DeepSpeed checkpoint at `source` (itself, via `latest`, or its only
    `global_step*` subdirectory); None when `source` is no DeepSpeed checkpoint."""
    if _is_tag_dir(source):
        return source
    if os.path.isfile(os.path.join(source, "latest")):
        # Opened as every file below a foreign directory is: no symlink, regular, small.
        raw = read_bytes_inside(source, "latest", max_bytes=_MAX_LATEST_BYTES)
        tag = os.path.basename(raw.decode("utf-8", "replace").strip())  # a subdirectory, never a path
        return _tag_below(source, tag) if tag not in ("", ".", "..") else None
    tags = [n for n in os.listdir(source) if n.startswith("global_step")] if os.path.isdir(source) else []
    return _tag_below(source, tags[0]) if len(tags) == 1 else None


_MAX_LATEST_BYTES = 4096


def _tag_below(source: str, tag: str) -> str | None:
    """`source/tag` when it is a DeepSpeed tag directory there: a link to a directory elsewhere is
    refused, since every read of the consolidation is confined to the tag directory it returns."""
    tag_dir = os.path.join(source, tag)
    if os.path.islink(tag_dir):
        raise UnsafeCheckpointError(source, [Problem(tag, "the tag directory is a symbolic link")])
    return tag_dir if _is_tag_dir(tag_dir) else None


def _is_tag_dir(directory: str) -> bool:
    return os.path.isdir(directory) and any(n.endswith("_optim_states.pt") for n in os.listdir(directory))


def fp32_state(
    tag_dir: str, *, listed: list[str] | None = None, checkpoint: str | None = None
) -> dict[str, Any]:
    """name -> fp32 tensor or a lazy DeepSpeed `GatheredTensor` (`.contiguous()` materializes it), from the
    fp32 master weights of every rank's partition (memory-mapped: nothing is read until asked for).
    DeepSpeed's zero_to_fp32 does the gathering; each of its reads goes through the weights-only
    `FileLoader`, confined to `tag_dir` (and to `listed` names, when given)."""
    from deepspeed.utils import zero_to_fp32

    loader = FileLoader(tag_dir, listed=listed, checkpoint=checkpoint)
    with module_reads_through(zero_to_fp32, loader):
        return dict(zero_to_fp32._get_fp32_state_dict_from_zero_checkpoint(tag_dir, False))


def consolidate(
    source: str,
    out: str,
    *,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
    config_dir: str | None = None,
    progress: Any = None,
) -> str:
    """Write the fp32 master weights of DeepSpeed checkpoint `source` as a transformers directory `out`,
    one output shard in memory at a time. config.json and tokenizer files come from `config_dir`, else
    from the nearest of `source` and its parents that has a config.json (a savepoint checkpoint's); a
    model transformers converts (MoE experts fused in memory) is written in the Hub's layout, as its
    `save_pretrained` writes it."""
    from savepoint.formats.hf import write_weights
    from savepoint.manifest import build_manifest
    from savepoint.side_files import copy_checkpoint_side_files, set_config_dtype
    from savepoint.storage.local import StagedDir

    tag_dir = find_checkpoint(source)
    if tag_dir is None:
        raise IncompatibleCheckpointError(f"{source} is no DeepSpeed checkpoint (no *_optim_states.pt)")
    state = fp32_state(tag_dir, **_enclosing_listing(tag_dir))
    first: dict[int, str] = {}
    names = [n for n, t in state.items() if first.setdefault(id(t), n) == n]  # tied weights once

    side = config_dir or _config_home(tag_dir)
    tensors, index_metadata = _in_hub_layout({n: state[n] for n in names}, side)
    staged = StagedDir(os.path.dirname(out), os.path.basename(out))
    try:
        write_weights(
            tensors,
            staged,
            max_shard_size=max_shard_size,
            dtype=dtype,
            progress=progress,
            index_metadata=index_metadata,
        )
        if side:
            copy_checkpoint_side_files(side, staged)
            if dtype is not None and os.path.exists(staged.abspath("config.json")):
                set_config_dtype(staged, dtype)
        staged.record_unlisted()
        return staged.commit(build_manifest("export", staged.entries).to_json(), replace=True)
    except BaseException:
        staged.abort()
        raise


def _in_hub_layout(
    state: dict[str, Any], config_dir: str | None
) -> tuple[Mapping[str, Any], dict[str, Any] | None]:
    """The weights under the Hub's names and shapes when transformers converts this model's (MoE experts
    fused in memory), as its `save_pretrained` writes them; else `state` as it is. Each tensor is gathered
    from the partitions only when its conversion group is written, so memory stays one group's worth."""
    from savepoint.formats.hub_layout import HubTensors, layout_for_config

    if config_dir is None or not os.path.isfile(os.path.join(config_dir, "config.json")):
        return state, None
    meta = {n: torch.empty(tuple(t.shape), dtype=t.dtype, device="meta") for n, t in state.items()}
    layout, num_parameters = layout_for_config(config_dir, meta)
    if layout is None:
        return state, None
    return HubTensors(layout, _Gathered(state)), {"total_parameters": num_parameters}


class _Gathered(Mapping[str, torch.Tensor]):
    """DeepSpeed's lazy `GatheredTensor`s as real tensors, each gathered when asked for (conversions
    need real tensors) and not kept."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.state[name].contiguous()

    def __iter__(self) -> Iterator[str]:
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)


def _enclosing_listing(tag_dir: str) -> dict[str, Any]:
    """Inside a savepoint checkpoint (`CKPT/train_state/deepspeed/global_stepN`): its manifest verified,
    no unlisted file in the tag directory, and reads confined to the listed ones."""
    from savepoint.manifest import MANIFEST_NAME, read_manifest

    tag_dir = os.path.abspath(tag_dir)
    ckpt = os.path.dirname(os.path.dirname(os.path.dirname(tag_dir)))
    rel = os.path.relpath(tag_dir, ckpt).replace(os.sep, "/")
    if not rel.startswith(DS_DIR + "/") or not os.path.isfile(os.path.join(ckpt, MANIFEST_NAME)):
        return {}  # a bare DeepSpeed directory: every read still weights-only and inside tag_dir
    manifest = read_manifest(ckpt)
    files = sorted(p for p in manifest.files if p.startswith(rel + "/"))
    verify_files(ckpt, manifest, files)
    unlisted = [
        Problem(f"{rel}/{n}", "present but not listed in the manifest")
        for n in sorted(os.listdir(tag_dir))
        if f"{rel}/{n}" not in manifest.files
    ]
    if unlisted:
        raise CorruptCheckpointError(ckpt, unlisted)
    return {"listed": [p[len(rel) + 1 :] for p in files], "checkpoint": ckpt}


def _config_home(tag_dir: str) -> str | None:
    directory = os.path.dirname(os.path.abspath(tag_dir))
    for _ in range(3):  # global_stepN -> deepspeed/ -> train_state/ -> the checkpoint
        if os.path.isfile(os.path.join(directory, "config.json")):
            return directory
        directory = os.path.dirname(directory)
    return None
