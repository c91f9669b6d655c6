"""`savepoint.save_pretrained`: a plain Hugging Face model directory, written atomically."""

from __future__ import annotations

import os
from typing import Any

import torch

from savepoint.formats.hf import write_model_files
from savepoint.manifest import build_manifest
from savepoint.storage.local import StagedDir


def save_pretrained(
    model: torch.nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    max_shard_size: int | str = "5GB",
    dtype: str | torch.dtype | None = None,
) -> str:
    """Write `model` (and `tokenizer`) as a directory `from_pretrained` loads; return its path.

    The directory appears whole or not at all (an existing one is replaced in one step). Tied
    weights are stored once; shards and index are named as transformers names them. A plain
    `nn.Module` becomes `model.safetensors` plus `savepoint_module.json`.

        >>> savepoint.save_pretrained(model, "export/", tokenizer=tok, dtype="bf16")  # doctest: +SKIP
    """
    out = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"{out} is a file; save_pretrained needs a directory path")
    from savepoint.pipeline.sources import is_collective

    if is_collective(model):  # torchrun: every rank calls this; rank 0 alone writes
        from savepoint.pipeline.save import save_pretrained_collective

        return save_pretrained_collective(
            model, out, tokenizer=tokenizer, max_shard_size=max_shard_size, dtype=dtype
        )
    staged = StagedDir(os.path.dirname(out), os.path.basename(out))
    try:
        kind = write_model_files(
            model, staged, tokenizer=tokenizer, max_shard_size=max_shard_size, dtype=dtype
        )
        manifest = build_manifest("export" if kind == "model" else kind, staged.entries)
        return staged.commit(manifest.to_json(), replace=True)
    except BaseException:
        staged.abort()
        raise
