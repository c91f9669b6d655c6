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

from savepoint.errors import CorruptCheckpointError, MergeError
from savepoint.io.files import DIRECTORY, FILE, walk_inside
from savepoint.lora.adapter import CONFIG_NAME
from savepoint.lora.base import INDEX, SINGLE
from savepoint.lora.merge import Progress, claim_output, merge_into_staged, rewrite_model_into_staged
from savepoint.manifest import Manifest, build_manifest, read_manifest, verify_files
from savepoint.side_files import copy_checked
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

    With `merge_lora=True` on a LoRA checkpoint the adapter is merged onto `base`. Without `base`, the
    base recorded in the checkpoint's manifest is used only when the manifest also records the base's
    weight fingerprint, which the merge then checks: a path alone, written by whoever made the
    checkpoint, is never trusted. Nothing is left at `out` if anything fails.
    """
    manifest = read_manifest(ckpt) if os.path.lexists(os.path.join(ckpt, MANIFEST_NAME)) else None
    is_adapter = os.path.exists(os.path.join(ckpt, CONFIG_NAME))
    final, replace = claim_output(out)
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
        base = base or _recorded_base(ckpt, recorded)
        return merge_into_staged(
            ckpt, staged, base=base, subdir="", dtype=dtype, max_shard_size=max_shard_size, progress=progress
        )
    if merge_lora:
        raise MergeError(
            f"{ckpt} is not a LoRA checkpoint (no {CONFIG_NAME}); export it without --merge-lora"
        )
    if dtype is not None and not is_adapter:
        weights = _copy_tree(staged, ckpt, manifest, progress, skip_weights=True)
        if manifest is not None:  # the weights are read by the re-sharder: verify them first, as a copy would
            listed = [rel for rel in manifest.files if _is_weight_file(rel)]
            verify_files(ckpt, manifest, sorted({*weights, *listed}))
        rewrite_model_into_staged(ckpt, staged, dtype=dtype, max_shard_size=max_shard_size, progress=progress)
        return None
    if dtype is not None:
        raise MergeError("--dtype applies to model weights; add --merge-lora to export a LoRA run as a model")
    _copy_tree(staged, ckpt, manifest, progress)
    return manifest.base_model if manifest else None


def _recorded_base(ckpt: str, recorded: dict[str, Any]) -> str:
    """The base path the manifest records, usable only with the fingerprint that the merge will check."""
    path, fingerprint = recorded.get("name_or_path"), recorded.get("fingerprint")
    if not isinstance(path, str) or not path:
        raise MergeError(f"{ckpt} does not record its base model; pass --base BASE_DIR")
    if not isinstance(fingerprint, str) or not fingerprint:
        raise MergeError(
            f"{ckpt} records the base path {path!r:.200} but no fingerprint of its weights, so nothing "
            "would show it is the right base (the path comes from whoever made the checkpoint); pass "
            "--base BASE_DIR"
        )
    return path


def _copy_tree(
    staged: StagedDir,
    ckpt: str,
    manifest: Manifest | None,
    progress: Progress | None,
    *,
    only: str | None = None,
    skip_weights: bool = False,
) -> list[str]:
    """Copy the checkpoint's exportable files, each checked as `savepoint.side_files` checks; return
    the weight files left out by `skip_weights` (the caller verifies those before reading them)."""
    files, weights = _files_to_export(ckpt, only=only, skip_weights=skip_weights)
    sizes = manifest.files if manifest is not None else {}
    total, done = sum(sizes[rel].size for rel in files if rel in sizes), 0
    problems = []
    for rel in files:
        dest = rel.removeprefix(f"{only}/") if only else rel
        problem = copy_checked(staged, ckpt, rel, dest, manifest)
        if problem:
            problems.append(problem)
            continue
        done += staged.entries[dest][0]
        if progress is not None:
            progress(done, max(total, done))
    if problems:
        raise CorruptCheckpointError(ckpt, problems, hint="nothing was exported; export an intact checkpoint")
    return weights


def _files_to_export(ckpt: str, *, only: str | None, skip_weights: bool) -> tuple[list[str], list[str]]:
    """(files to copy, weight files skipped), walking without following symlinks; a symlink or special
    file is kept in the list so that copying it reports it by name. Training files at the top (of the
    checkpoint, or of `only`) are left out: the output is for deployment."""
    out, weights = [], []

    def at_top(rel: str) -> bool:
        return "/" not in (rel.removeprefix(f"{only}/") if only else rel)

    def skip(rel: str) -> bool:
        return only is None and at_top(rel) and _matches(rel, EXCLUDED_DIRS)

    for rel, kind in walk_inside(ckpt, only or "", skip=skip):
        name = rel.rsplit("/", 1)[-1]
        if kind == DIRECTORY or name.startswith(".tmp-") or (at_top(rel) and _matches(name, EXCLUDED_FILES)):
            continue
        if skip_weights and kind == FILE and _is_weight_file(rel):
            weights.append(rel)
            continue
        out.append(rel)
    return sorted(out), sorted(weights)


def _is_weight_file(rel: str) -> bool:
    return rel in (SINGLE, INDEX, "config.json") or (
        rel.startswith("model-") and rel.endswith(".safetensors")
    )


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)
