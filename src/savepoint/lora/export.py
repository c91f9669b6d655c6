"""`savepoint export`: a deployable model directory from any training checkpoint.

A full-model checkpoint is copied without its training files (`train_state/`, `trainer_state.json`,
`metrics.json`, the checkpoint's `savepoint.json`: the output gets its own, of kind "export", without
step, metrics or parent; and the Trainer's or DeepSpeed's own training files where a directory has
them), or re-sharded when a dtype is asked for; a LoRA checkpoint is copied as an adapter,
or merged onto its base with `merge_lora=True`. Every copied byte is hashed on the way and checked
against the checkpoint's manifest, so a damaged checkpoint is refused in the same single pass.

    >>> export_checkpoint("runs/sft/step-00001200", "deploy/sft", merge_lora=True, dtype="bf16")  # doctest: +SKIP
"""

from __future__ import annotations

import fnmatch
import os
from typing import Any

import torch

from savepoint.errors import CorruptCheckpointError, MergeError, Problem
from savepoint.lora.adapter import CONFIG_NAME
from savepoint.lora.base import INDEX, SINGLE
from savepoint.lora.merge import Progress, _claim_output, merge_into_staged, rewrite_model_into_staged
from savepoint.lora.output import copy_file
from savepoint.manifest import Manifest, build_manifest, read_manifest, resolve_inside
from savepoint.storage.local import MANIFEST_NAME, StagedDir

# Training files, left out of a deployment directory (glob patterns on a top-level file's name).
EXCLUDED_FILES = (
    MANIFEST_NAME,
    "metrics.json",
    "trainer_state.json",
    "training_args.bin",
    "optimizer.pt",
    "optimizer.bin",
    "scheduler.pt",
    "scaler.pt",
    "rng_state*.pth",
    "latest",  # DeepSpeed's pointer to its global_step* directory
    "zero_to_fp32.py",
)
EXCLUDED_DIRS = ("train_state", "merged", "global_step*")
MERGED_DIR = "merged"


def export_checkpoint(
    ckpt: str,
    out: str,
    *,
    merge_lora: bool = False,
    base: str | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    progress: Progress | None = None,
) -> str:
    """Write a model (or adapter) directory at `out` from checkpoint `ckpt`; return the absolute `out`.

    With `merge_lora=True` on a LoRA checkpoint the adapter is merged onto `base`, by default the base
    recorded in the checkpoint's manifest. Nothing is left at `out` if anything fails.
    """
    manifest = read_manifest(ckpt) if os.path.exists(os.path.join(ckpt, MANIFEST_NAME)) else None
    is_adapter = os.path.exists(os.path.join(ckpt, CONFIG_NAME))
    final, replace = _claim_output(out)
    staged = StagedDir(os.path.dirname(final), os.path.basename(final))
    try:
        base_info = _export_into(
            staged, ckpt, manifest, is_adapter, merge_lora, base, dtype, max_shard_size, progress
        )
        result = build_manifest("export", staged.entries, base_model=base_info)
        return staged.commit(result.to_json(), replace=replace)
    except BaseException:
        staged.abort()
        raise


def _export_into(
    staged: StagedDir,
    ckpt: str,
    manifest: Manifest | None,
    is_adapter: bool,
    merge_lora: bool,
    base: str | None,
    dtype: str | torch.dtype | None,
    max_shard_size: int | str,
    progress: Progress | None,
) -> dict[str, Any] | None:
    if is_adapter and merge_lora:
        recorded = (manifest.base_model or {}) if manifest else {}
        if base is None and dtype is None and os.path.isdir(os.path.join(ckpt, MERGED_DIR)):
            _copy_tree(staged, ckpt, manifest, progress, only=MERGED_DIR)  # the final save merged already
            return recorded or None
        base = base or recorded.get("name_or_path")
        if not base:
            raise MergeError(f"{ckpt} does not record its base model; pass --base BASE_DIR")
        return merge_into_staged(
            ckpt, staged, base=base, subdir="", dtype=dtype, max_shard_size=max_shard_size, progress=progress
        )
    if merge_lora:
        raise MergeError(
            f"{ckpt} is not a LoRA checkpoint (no {CONFIG_NAME}); export it without --merge-lora"
        )
    if dtype is not None and not is_adapter:
        _copy_tree(staged, ckpt, manifest, progress, skip_weights=True)
        rewrite_model_into_staged(ckpt, staged, dtype=dtype, max_shard_size=max_shard_size, progress=progress)
        return None
    if dtype is not None:
        raise MergeError("--dtype applies to model weights; add --merge-lora to export a LoRA run as a model")
    _copy_tree(staged, ckpt, manifest, progress)
    return manifest.base_model if manifest else None


def _copy_tree(
    staged: StagedDir,
    ckpt: str,
    manifest: Manifest | None,
    progress: Progress | None,
    *,
    only: str | None = None,
    skip_weights: bool = False,
) -> None:
    files = _files_to_export(ckpt, only=only, skip_weights=skip_weights)
    total, done = sum(os.path.getsize(os.path.join(ckpt, rel)) for rel in files), 0
    problems = []
    for rel in files:
        dest = rel.removeprefix(f"{only}/") if only else rel
        copy_file(staged, resolve_inside(ckpt, rel), dest)
        problem = _check_against(manifest, rel, staged.entries[dest])
        if problem:
            problems.append(problem)
        done += staged.entries[dest][0]
        if progress is not None:
            progress(done, total)
    if problems:
        raise CorruptCheckpointError(ckpt, problems, hint="nothing was exported; export an intact checkpoint")


def _files_to_export(ckpt: str, *, only: str | None, skip_weights: bool) -> list[str]:
    out = []
    start = os.path.join(ckpt, only) if only else ckpt
    for dirpath, dirs, names in os.walk(start):
        rel_dir = os.path.relpath(dirpath, ckpt).replace(os.sep, "/")
        top = rel_dir == "." or (only and rel_dir == only)
        if top:
            dirs[:] = sorted(d for d in dirs if only or not _matches(d, EXCLUDED_DIRS))
        for name in sorted(names):
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if (top and _matches(name, EXCLUDED_FILES)) or name.startswith(".tmp-"):
                continue
            if skip_weights and (
                rel in (SINGLE, INDEX, "config.json")
                or (rel.startswith("model-") and rel.endswith(".safetensors"))
            ):
                continue
            out.append(rel)
    return out


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _check_against(manifest: Manifest | None, rel: str, entry: tuple[int, str]) -> Problem | None:
    if manifest is None:
        return None
    recorded = manifest.files.get(rel)
    if recorded is None:
        return Problem(rel, "present but not listed in the manifest (planted or left over)")
    if (recorded.size, recorded.checksum) != entry:
        return Problem(
            rel, f"size/checksum {entry} differ from the manifest's ({recorded.size}, {recorded.checksum})"
        )
    return None
