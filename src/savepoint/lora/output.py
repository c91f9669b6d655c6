"""Write a model directory: transformers-style safetensors shards, one tensor in memory at a time,
plus the index. The small files (config, tokenizer) are copied by `savepoint.side_files`.

The shard plan comes from huggingface_hub's splitter (so names, index and split points are what
transformers writes); each shard's header is written from shapes and dtypes known up front, then each
tensor is produced, written and dropped before the next is made.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch
from huggingface_hub import split_state_dict_into_shards_factory

from savepoint.errors import MergeError
from savepoint.formats.safetensors_io import write_streamed

if TYPE_CHECKING:
    from savepoint.storage.local import StagedDir

INDEX_NAME = "model.safetensors.index.json"
_PATTERN = "model{suffix}.safetensors"
_CHUNK = 64 * 1024 * 1024


def plan_shards(
    layout: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], max_shard_size: int | str
) -> dict[str, list[str]]:
    """filename -> keys, as transformers would shard tensors of these dtypes and shapes."""
    sizes = {k: int(torch.Size(shape).numel()) * dtype.itemsize for k, (dtype, shape) in layout.items()}
    split = split_state_dict_into_shards_factory(
        sizes, get_storage_size=lambda n: n, filename_pattern=_PATTERN, max_shard_size=max_shard_size
    )
    return split.filename_to_tensors


def write_shard(
    staged: StagedDir,
    relpath: str,
    layout: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
    produce: Callable[[str], torch.Tensor],
    *,
    on_tensor: Callable[[int], None] | None = None,
    on_written: Callable[[torch.Tensor], None] | None = None,
) -> None:
    """Write one shard holding `layout`'s keys in order; `produce(key)` makes each tensor when needed
    (`on_written(tensor)` hears when one is out: see write_streamed)."""
    with staged.create(relpath, direct=True) as out:  # around the page cache: see savepoint.io.direct
        try:
            write_streamed(out, layout, produce, {"format": "pt"}, on_tensor=on_tensor, on_written=on_written)
        except ValueError as exc:
            raise MergeError(f"internal error writing {relpath}: {exc}") from exc


def write_index(staged: StagedDir, relpath: str, shards: Mapping[str, list[str]], total_size: int) -> None:
    """The `model.safetensors.index.json` transformers reads for a sharded model."""
    weight_map = {k: name for name, keys in shards.items() for k in keys}
    doc = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    staged.write_bytes(relpath, (json.dumps(doc, indent=2) + "\n").encode())
