"""The streaming LoRA merge: base shards in, merged transformers shards out, one tensor at a time.

    >>> from savepoint import merge_lora
    >>> merge_lora("runs/sft/step-00001200", base="models/llama-1b", out="deploy/llama-sft")  # doctest: +SKIP
    '/abs/deploy/llama-sft'

Memory stays at one base tensor (plus its float32 copy) and the adapter, whatever the model's size.
The output is staged next to `out` and renamed into place only when complete, so a failure (wrong
base, NaN, full disk) leaves nothing at `out`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from savepoint.errors import IncompatibleCheckpointError, MergeError
from savepoint.formats.hub_layout import hub_names, meta_model_for_config
from savepoint.io.memory import BufferPool
from savepoint.lora import math as lora_math
from savepoint.lora.adapter import (
    MergePlan,
    build_plan,
    load_adapter_tensors,
    read_adapter_config,
)
from savepoint.lora.base import BaseWeights, read_model_config
from savepoint.lora.blocked import BlockedMerger
from savepoint.lora.experts import ExpertStream, meta_twin, take_expert_edits
from savepoint.lora.fingerprint import Fingerprinter, base_state_items, unwrap_peft
from savepoint.lora.output import INDEX_NAME, plan_shards, write_index, write_shard
from savepoint.lora.validate import check_plan
from savepoint.manifest import build_manifest, read_manifest
from savepoint.side_files import copy_present
from savepoint.storage.local import MANIFEST_NAME, StagedDir

Progress = Callable[[int, int], None]  # (bytes done, bytes total)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}


@dataclass
class _Adapter:
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    tokenizer_dir: str | None = None  # tokenizer files next to the adapter win over the base's
    expected_fingerprint: str | None = None  # from a savepoint checkpoint's manifest


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """`"bf16"`, `"fp16"`, `"fp32"` (or their torch names, or a torch.dtype) to a torch.dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise MergeError(f"unknown dtype {dtype!r}; use bf16, fp16 or fp32") from None


def merge_lora(
    adapter_dir: str,
    *,
    base: str,
    out: str,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    progress: Progress | None = None,
) -> str:
    """Merge a LoRA adapter into its base and write a plain transformers model directory at `out`.

    `adapter_dir` is any directory peft wrote, or a savepoint checkpoint of a LoRA run (then its
    checksums are verified and its recorded base fingerprint must match `base`). `dtype` casts the
    floating weights of the result (default: the base's own dtypes). Returns the absolute `out`.

    >>> merge_lora("adapter/", base="llama-1b/", out="merged/", dtype="bf16")  # doctest: +SKIP
    """
    final, replace = claim_output(out)
    staged = StagedDir(os.path.dirname(final), os.path.basename(final))
    try:
        info = merge_into_staged(
            adapter_dir,
            staged,
            base=base,
            subdir="",
            dtype=dtype,
            max_shard_size=max_shard_size,
            progress=progress,
        )
        manifest = build_manifest("export", staged.entries, base_model=info)
        return staged.commit(manifest.to_json(), replace=replace)
    except BaseException:
        staged.abort()
        raise


def merge_into_staged(
    source: str | torch.nn.Module,
    staged: StagedDir,
    *,
    base: str | None = None,
    subdir: str = "merged",
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Write the merged model into `staged.path/subdir` (not committed: the caller commits).

    `source` is an adapter directory or an in-memory peft `PeftModel`; `base` the base model
    directory, or None to take the base weights from the in-memory model itself (a `final=True` save).
    Returns the base's description for a manifest (`name_or_path`, `fingerprint`, ...).

    >>> merge_into_staged(peft_model, staged, subdir="merged")  # doctest: +SKIP
    """
    base_dir = base
    adapter = (
        _adapter_from_model(source) if isinstance(source, torch.nn.Module) else _adapter_from_dir(source)
    )
    plan = build_plan(adapter.config, adapter.tensors)
    if base_dir is not None:
        weights, model_config = BaseWeights.open(base_dir), read_model_config(base_dir)
    elif isinstance(source, torch.nn.Module):
        weights, model_config = BaseWeights.from_module(source), _module_config(source)
    else:
        raise MergeError("merging an adapter directory needs the base model directory (base=...)")
    experts = _expert_stream(plan, base_dir, source, weights)
    _name_as_the_base(plan, weights, base_dir, source)
    check_plan(plan, weights.infos, model_config)
    fingerprint = _write_weights(
        plan, weights, staged, subdir, parse_dtype(dtype), max_shard_size, progress, experts
    )
    _write_model_files(staged, subdir, base_dir, source, adapter, model_config, parse_dtype(dtype))
    if adapter.expected_fingerprint and adapter.expected_fingerprint != fingerprint["fingerprint"]:
        raise IncompatibleCheckpointError(
            f"the base {base_dir} is not the base this adapter was trained on (its weights' fingerprint "
            f"{fingerprint['fingerprint']} differs from the recorded {adapter.expected_fingerprint}); "
            "pass the original base"
        )
    name = base_dir or getattr(getattr(source, "config", None), "_name_or_path", None)
    return {"name_or_path": name or adapter.config.get("base_model_name_or_path"), **fingerprint}


def _name_as_the_base(
    plan: MergePlan, weights: BaseWeights, base_dir: str | None, source: str | torch.nn.Module
) -> None:
    """peft names adapter tensors after the model in memory; a base in the Hub's layout may name the
    same weights otherwise (a vision-language model's `model.language_model.` is the Hub's
    `language_model.model.`). Rename the plan's missing keys as transformers' own conversions do."""
    if all(k in weights.infos for k in plan.touched):
        return
    if base_dir is not None:
        model = meta_model_for_config(base_dir)
        state = model.state_dict() if model is not None else {}
    else:
        assert isinstance(source, torch.nn.Module)  # merge_into_staged needs a base dir for a directory
        model, state = unwrap_peft(source), dict(base_state_items(source))
    names = hub_names(model, state) if model is not None else {}
    plan.rename({k: names[k] for k in plan.touched if k not in weights.infos and k in names})


def rewrite_model_into_staged(
    model_dir: str,
    staged: StagedDir,
    *,
    subdir: str = "",
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Re-shard (and cast to `dtype`) a model directory's weights into `staged`, streaming; also writes
    config.json with the new dtype. Other files are the caller's to copy. Returns the weights' fingerprint."""
    weights, model_config = BaseWeights.open(model_dir), read_model_config(model_dir)
    fingerprint = _write_weights(
        MergePlan(config={}), weights, staged, subdir, parse_dtype(dtype), max_shard_size, progress
    )
    _write_config(staged, subdir, model_config, parse_dtype(dtype))
    return fingerprint


def _expert_stream(
    plan: MergePlan, base_dir: str | None, source: str | torch.nn.Module, weights: BaseWeights
) -> ExpertStream | None:
    """The merge of LoRA on fused MoE experts (target_parameters), taken out of `plan`; None without any."""
    if not plan.config.get("target_parameters"):
        return None
    if base_dir is not None:
        model = meta_model_for_config(base_dir)
    else:
        assert isinstance(source, torch.nn.Module)  # merge_into_staged needs a base dir for a directory
        model = meta_twin(unwrap_peft(source))
    edits = take_expert_edits(plan, model)
    return ExpertStream(model, edits, weights.infos) if edits else None


def _write_weights(
    plan: MergePlan,
    weights: BaseWeights,
    staged: StagedDir,
    subdir: str,
    dtype: torch.dtype | None,
    max_shard_size: int | str,
    progress: Progress | None,
    experts: ExpertStream | None = None,
) -> dict[str, Any]:
    layout = {
        k: (dtype if dtype is not None and i.dtype.is_floating_point else i.dtype, i.shape)
        for k, i in weights.infos.items()
    }
    shards = plan_shards(layout, max_shard_size)
    total = sum(int(torch.Size(shape).numel()) * dt.itemsize for dt, shape in layout.values())
    done = 0
    fp = Fingerprinter()

    pool = BufferPool()  # base and merged tensors land in recycled memory (see io/memory.py)

    def produce(key: str) -> torch.Tensor:
        if experts is not None and experts.covers(key):
            base, merged = experts.take(key, weights)  # buffers of its own: they outlive one tensor
            fp.add(base)
            return finished(key, merged, layout[key][0]).contiguous()
        base = weights.get(key, pool.take)
        fp.add(base)
        out = merged_tensor(key, base, plan, layout[key][0], merger)
        if out.untyped_storage().data_ptr() != base.untyped_storage().data_ptr():
            pool.give(base)  # merged into a new tensor: the base's buffer is free now
        return out

    def advance(nbytes: int) -> None:
        nonlocal done
        done += nbytes
        if progress is not None:
            progress(done, total)

    with weights, BlockedMerger(allocate=pool.take) as merger:
        for name, keys in shards.items():
            shard_layout = {k: layout[k] for k in keys}
            relpath = os.path.join(subdir, name)
            write_shard(staged, relpath, shard_layout, produce, on_tensor=advance, on_written=pool.give)
    if len(shards) > 1:
        write_index(staged, os.path.join(subdir, INDEX_NAME), shards, total)
    return fp.result()


def merged_tensor(
    key: str, base: torch.Tensor, plan: MergePlan, dtype: torch.dtype, merger: BlockedMerger | None = None
) -> torch.Tensor:
    """The output tensor for one base key: merged if the plan touches it, else the base cast to `dtype`.
    With `merger`, plain linear merges run cache-blocked on its worker threads."""
    if key in plan.replace:
        merged = plan.replace[key].to(torch.float32)
    elif key in plan.weights:
        edit = plan.weights[key]
        w = edit.base_override if edit.base_override is not None else base
        assert edit.a is not None and edit.b is not None  # build_plan guarantees both
        if merger is not None and not (edit.embedding or edit.transposed) and edit.magnitude is None:
            blocked = merger.merge_linear(w, edit.a, edit.b, scaling=edit.scaling, dtype=dtype)
            if blocked is not None:
                return blocked
        if edit.embedding:
            merged = lora_math.merge_embedding(
                w, edit.a, edit.b, scaling=edit.scaling, magnitude=edit.magnitude
            )
        else:
            merged = lora_math.merge_linear(
                w, edit.a, edit.b, scaling=edit.scaling, transposed=edit.transposed, magnitude=edit.magnitude
            )
    elif key in plan.biases:
        edit = plan.biases[key]
        assert edit.bias is not None
        merged = lora_math.merge_bias(base, edit.bias, scaling=edit.scaling)
    else:
        return base.to(dtype)
    return finished(key, merged, dtype)


def finished(key: str, merged: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float32 merged tensor cast to `dtype`; MergeError if it is not finite there."""
    if lora_math.fits(merged, dtype):
        return merged.to(dtype)
    bad = lora_math.first_non_finite(merged.to(dtype))
    if bad:
        raise MergeError(
            f"merged tensor {key!r} is not finite: {bad}; the adapter or base is broken. Nothing was committed."
        )
    return merged.to(dtype)  # finite after all: it sat within half an ulp of the dtype's maximum


def claim_output(out: str) -> tuple[str, bool]:
    """The absolute output path, and whether an existing empty directory must be replaced."""
    final = os.path.abspath(out)
    if not os.path.lexists(final):
        return final, False
    if os.path.isdir(final) and not os.path.islink(final) and not os.listdir(final):
        return final, True
    raise MergeError(f"the output {final} already exists and is not empty; choose a new path or remove it")


def _adapter_from_dir(adapter_dir: str) -> _Adapter:
    if not os.path.isdir(adapter_dir):
        raise MergeError(f"the adapter {adapter_dir} is not a directory")
    expected = None
    if os.path.exists(os.path.join(adapter_dir, MANIFEST_NAME)):
        base_info = read_manifest(adapter_dir).base_model or {}
        expected = base_info.get("fingerprint")
    has_tokenizer = any(os.path.exists(os.path.join(adapter_dir, n)) for n in TOKENIZER_FILES)
    return _Adapter(
        config=read_adapter_config(adapter_dir),
        tensors=load_adapter_tensors(adapter_dir),
        tokenizer_dir=adapter_dir if has_tokenizer else None,
        expected_fingerprint=expected if isinstance(expected, str) else None,
    )


def _adapter_from_model(model: torch.nn.Module) -> _Adapter:
    from peft.utils import get_peft_model_state_dict

    name = getattr(model, "active_adapter", "default")
    peft_config = getattr(model, "peft_config", {}).get(name)
    if peft_config is None:
        raise MergeError(f"{type(model).__name__} is not a peft PeftModel with an active adapter")
    config = json.loads(json.dumps(peft_config.to_dict(), default=list))  # sets -> lists, enums -> str
    state = get_peft_model_state_dict(model, adapter_name=name)
    return _Adapter(config=config, tensors={k: v.detach().cpu() for k, v in state.items()})


def _module_config(model: torch.nn.Module) -> dict[str, Any]:
    config = getattr(unwrap_peft(model), "config", None)
    return config.to_dict() if config is not None else {}


def _write_model_files(
    staged: StagedDir,
    subdir: str,
    base_dir: str | None,
    source: str | torch.nn.Module,
    adapter: _Adapter,
    model_config: dict[str, Any],
    dtype: torch.dtype | None,
) -> None:
    """config.json (dtype updated), generation_config.json and tokenizer files next to the weights."""
    _write_config(staged, subdir, model_config, dtype)
    if base_dir is not None:
        copy_present(staged, base_dir, ("generation_config.json",), subdir)
    else:
        gen = getattr(source, "generation_config", None)
        if gen is not None:
            staged.write_bytes(os.path.join(subdir, "generation_config.json"), gen.to_json_string().encode())
    tokenizer_dir = adapter.tokenizer_dir or base_dir
    if tokenizer_dir is not None:
        copy_present(staged, tokenizer_dir, TOKENIZER_FILES, subdir)


def _write_config(
    staged: StagedDir, subdir: str, model_config: dict[str, Any], dtype: torch.dtype | None
) -> None:
    config = dict(model_config)
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)
    if config:
        staged.write_bytes(
            os.path.join(subdir, "config.json"), (json.dumps(config, indent=2) + "\n").encode()
        )
