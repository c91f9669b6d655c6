"""`consolidate`: a sharded checkpoint into a plain Hugging Face safetensors model directory.

Runs on one machine without a process group. The output is planned from DCP's metadata (names,
shapes, dtypes) and split into shards by huggingface_hub's splitter; then each output shard is
streamed: its header is written from the plan, then its tensors are loaded from the rank shards in
batches of at most ~256 MB (DCP reads exactly the chunks it needs) and written as they arrive, so
memory is bounded by the largest tensor or one batch, not by a shard or the model.

    >>> consolidate("runs/x/step-00001000", "export/")  # doctest: +SKIP

Sources: a savepoint checkpoint saved with `sharded_model=True` (verified against its manifest
first; a file it does not list is refused), or, with `trust_metadata=True`, a bare DCP directory
written by another tool. Either way torch's `.metadata` (a pickle) is read only through savepoint's
allow-list reader (formats/dcp_metadata.py), never unpickled: without a manifest nothing vouches
for the bytes, so the flag says that you know where the directory comes from.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards

from savepoint.errors import (
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    Problem,
    UnsafeCheckpointError,
)
from savepoint.formats import sharded
from savepoint.formats.hf import WEIGHTS_INDEX_NAME, parse_dtype, write_weights
from savepoint.formats.hub_layout import HubTensors, layout_for_config
from savepoint.formats.safetensors_io import write_streamed
from savepoint.manifest import MANIFEST_NAME, build_manifest, find_problems, read_manifest
from savepoint.side_files import copy_checkpoint_side_files, set_config_dtype
from savepoint.storage.local import StagedDir

Progress = Callable[[str, int, int], None]  # (output file, shards done, shards in all)
_BATCH_BYTES = 256 * 1024 * 1024  # per DCP load: few calls, bounded memory


def consolidate(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    max_shard_size: int | str = "5GB",
    dtype: str | torch.dtype | None = None,
    config_dir: str | os.PathLike[str] | None = None,
    trust_metadata: bool = False,
    progress: Progress | None = None,
) -> str:
    """Write the model weights of sharded checkpoint `source` as a transformers directory `out`.

    config.json, generation_config.json and tokenizer files come along from the checkpoint (or
    from `config_dir`). The output appears whole or not at all.
    """
    source, out = os.fspath(source), os.path.abspath(os.fspath(out))
    if not os.path.exists(os.path.join(source, MANIFEST_NAME)) and _is_deepspeed_checkpoint(source):
        from savepoint.integrations import deepspeed

        cfg = os.fspath(config_dir) if config_dir else None
        target = parse_dtype(dtype)
        return deepspeed.consolidate(
            source, out, max_shard_size=max_shard_size, dtype=target, config_dir=cfg, progress=progress
        )
    dcp_dir, extra_dir, metadata = _locate(source, trust_metadata)
    names = _tensor_plan(metadata)
    if not names:
        raise IncompatibleCheckpointError(
            f"{source} holds no model weights in its DCP directory (no `model.` tensors); it was saved "
            "without sharded_model=True, so its model files are already a transformers directory"
        )
    target = parse_dtype(dtype)
    staged = StagedDir(os.path.dirname(out), os.path.basename(out))
    try:
        config_source = os.fspath(config_dir) if config_dir else extra_dir
        if not _write_hub_layout(
            dcp_dir, metadata, names, config_source, staged, max_shard_size, target, progress
        ):
            _write_shards(dcp_dir, metadata, names, staged, max_shard_size, target, progress)
        for directory in (extra_dir, os.fspath(config_dir) if config_dir else None):
            if directory:
                copy_checkpoint_side_files(directory, staged)
        if target is not None and os.path.exists(staged.abspath("config.json")):
            set_config_dtype(staged, target)
        staged.record_unlisted()
        return staged.commit(build_manifest("export", staged.entries).to_json(), replace=True)
    except BaseException:
        staged.abort()
        raise


def _is_deepspeed_checkpoint(source: str) -> bool:
    """A DeepSpeed `save_checkpoint` directory (its pickles are read with torch's weights_only unpickler)."""
    try:
        from savepoint.integrations.deepspeed import find_checkpoint
    except ImportError:
        return False
    return find_checkpoint(source) is not None


def _locate(source: str, trust_metadata: bool) -> tuple[str, str | None, Any]:
    """(DCP directory, directory whose config/tokenizer files come along, its checked DCP metadata)."""
    from savepoint.formats.dcp_reader import read_dcp_metadata

    if os.path.exists(os.path.join(source, MANIFEST_NAME)):
        manifest = read_manifest(source)
        if manifest.kind != "sharded":
            raise IncompatibleCheckpointError(
                f"{source} is a {manifest.kind!r} checkpoint: its model files already load with "
                "from_pretrained, there is nothing to consolidate (use `savepoint export` to copy or cast them)"
            )
        problems = find_problems(source, manifest, check_unlisted=True)  # nothing unlisted is read
        if problems:
            raise CorruptCheckpointError(source, problems)
        return os.path.join(source, sharded.DCP_DIR), source, sharded.read_metadata(source, manifest)
    if os.path.exists(os.path.join(source, ".metadata")):
        if not trust_metadata:
            problem = Problem(".metadata", "DCP metadata (a pickle) that no savepoint manifest vouches for")
            raise UnsafeCheckpointError(
                source,
                [problem],
                hint=(
                    "Pass trust_metadata=True (CLI: --trust-dcp-metadata) only for a directory whose origin "
                    "you know; it is still read through savepoint's allow-list, never unpickled."
                ),
            )
        return source, None, read_dcp_metadata(source, "")
    raise IncompatibleCheckpointError(
        f"{source} is neither a savepoint checkpoint nor a DCP directory (no .metadata)"
    )


def _tensor_plan(metadata: Any) -> dict[str, tuple[str, torch.Size, torch.dtype]]:
    """output name -> (DCP key, shape, dtype), for the model's tensors (`model.` keys, else all tensors)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    tensors = {k: m for k, m in metadata.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}
    prefix = sharded.MODEL_PREFIX if any(k.startswith(sharded.MODEL_PREFIX) for k in tensors) else ""
    if prefix == "" and any(k.startswith(sharded.OPTIM_PREFIX) for k in tensors):
        return {}
    return {
        k[len(prefix) :]: (k, m.size, m.properties.dtype)
        for k, m in sorted(tensors.items())
        if k.startswith(prefix)
    }


def _write_hub_layout(
    dcp_dir: str,
    metadata: Any,
    names: dict[str, tuple[str, torch.Size, torch.dtype]],
    config_source: str | None,
    staged: StagedDir,
    max_shard_size: int | str,
    dtype: torch.dtype | None,
    progress: Progress | None,
) -> bool:
    """Write the weights in the Hub's layout when the model converts them (MoE experts, VLM prefixes),
    reading each tensor from the shards when its conversion group is written; False when it does not."""
    if config_source is None or not os.path.exists(os.path.join(config_source, "config.json")):
        return False
    meta = {n: torch.empty(shape, dtype=d, device="meta") for n, (_, shape, d) in names.items()}
    layout, num_parameters = layout_for_config(config_source, meta)
    if layout is None:
        return False
    write_weights(
        HubTensors(layout, _DcpTensors(dcp_dir, metadata, names)),
        staged,
        max_shard_size=max_shard_size,
        dtype=dtype,
        progress=progress,
        index_metadata={"total_parameters": num_parameters},
    )
    return True


class _DcpTensors(Mapping[str, torch.Tensor]):
    """The model's tensors in a DCP directory, each read from the rank shards when asked for."""

    def __init__(
        self, dcp_dir: str, metadata: Any, names: dict[str, tuple[str, torch.Size, torch.dtype]]
    ) -> None:
        self.dcp_dir, self.metadata, self.names = dcp_dir, metadata, names

    def __getitem__(self, name: str) -> torch.Tensor:
        # Through the allow-list reader: the metadata was checked once, and no pickle is loaded here.
        from savepoint.formats.dcp_reader import load_tensors

        key, shape, dtype = self.names[name]
        buffers = {key: torch.empty(shape, dtype=dtype)}
        load_tensors(self.dcp_dir, self.metadata, buffers, checkpoint=self.dcp_dir)
        return buffers[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _write_shards(
    dcp_dir: str,
    metadata: Any,
    names: dict[str, tuple[str, torch.Size, torch.dtype]],
    staged: StagedDir,
    max_shard_size: int | str,
    dtype: torch.dtype | None,
    progress: Progress | None,
) -> None:
    def out_dtype(d: torch.dtype) -> torch.dtype:
        return dtype if dtype is not None and d.is_floating_point else d

    planned = {n: torch.empty(shape, dtype=out_dtype(d), device="meta") for n, (_, shape, d) in names.items()}
    split = split_torch_state_dict_into_shards(
        planned, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    total = len(split.filename_to_tensors)
    for done, (filename, members) in enumerate(split.filename_to_tensors.items(), start=1):
        layout = {n: (planned[n].dtype, tuple(planned[n].shape)) for n in members}
        loader = _BatchedLoader(dcp_dir, metadata, names, members, out_dtype)
        with staged.create(filename) as f:
            write_streamed(f, layout, loader.take, {"format": "pt"})
        if progress is not None:
            progress(filename, done, total)
    if split.is_sharded:
        index = {
            "metadata": dict(split.metadata),
            "weight_map": dict(sorted(split.tensor_to_filename.items())),
        }
        staged.write_bytes(WEIGHTS_INDEX_NAME, json.dumps(index, indent=2).encode())


class _BatchedLoader:
    """Loads a shard's tensors from DCP in file order, a batch of at most `_BATCH_BYTES` (or one larger
    tensor) per load, and hands each out once: fewer DCP calls than one per tensor, and never a whole
    shard in memory."""

    def __init__(
        self,
        dcp_dir: str,
        metadata: Any,
        names: dict[str, tuple[str, torch.Size, torch.dtype]],
        members: list[str],
        out_dtype: Callable[[torch.dtype], torch.dtype],
    ) -> None:
        self.dcp_dir, self.metadata, self.names, self.pending = dcp_dir, metadata, names, list(members)
        self.out_dtype = out_dtype
        self.ready: dict[str, torch.Tensor] = {}

    def take(self, name: str) -> torch.Tensor:
        if name not in self.ready:
            self._load_from(name)
        return self.ready.pop(name).to(self.out_dtype(self.names[name][2]))

    def _load_from(self, first: str) -> None:
        from savepoint.formats.dcp_reader import load_tensors

        start = self.pending.index(first)
        batch: list[str] = []
        size = 0
        for n in self.pending[start:]:
            _, shape, dtype = self.names[n]
            nbytes = int(shape.numel()) * dtype.itemsize
            if batch and size + nbytes > _BATCH_BYTES:
                break
            batch.append(n)
            size += nbytes
        del self.pending[start : start + len(batch)]
        buffers = {self.names[n][0]: torch.empty(self.names[n][1], dtype=self.names[n][2]) for n in batch}
        load_tensors(self.dcp_dir, self.metadata, buffers, checkpoint=self.dcp_dir)
        self.ready.update({n: buffers[self.names[n][0]] for n in batch})
