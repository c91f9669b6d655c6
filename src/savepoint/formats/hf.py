"""Hugging Face model directories: the model files of a checkpoint and of `save_pretrained`.

A transformers model becomes what `from_pretrained` expects: config.json, generation_config.json,
`model.safetensors` or shards named and indexed exactly as transformers names them (huggingface_hub's
splitter decides the shards), and the tokenizer's files. Weights go in the Hub's layout, which
transformers' own conversions give (`formats/hub_layout.py`: MoE experts one tensor per expert, not
fused). A plain `nn.Module` becomes `model.safetensors` plus `savepoint_module.json`.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards

from savepoint._json import MAX_JSON_BYTES, parse_json, read_json_inside
from savepoint.errors import CorruptCheckpointError, IncompatibleCheckpointError, Problem
from savepoint.formats.hub_layout import HubLayout, HubLoader, HubTensors, plan_hub_layout
from savepoint.formats.safetensors_io import DTYPE_NAMES, read_header, read_safetensors, write_streamed
from savepoint.manifest import Manifest, resolve_inside, verify_files
from savepoint.storage.local import StagedDir, storage_error
from savepoint.verified_read import read_bytes_verified

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
MODULE_INFO_NAME = "savepoint_module.json"
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Accept torch dtypes and the short names the CLI uses (bf16, fp16, fp32)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    aliases = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}
    key = aliases.get(key, key)
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of bf16, fp16, fp32")
    return _DTYPES[key]


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The user's model under DDP/DataParallel and torch.compile wrappers, so names do not depend on wrapping."""
    while True:
        inner = getattr(model, "module", None) if isinstance(model, _WRAPPERS) else None
        inner = inner or getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


_WRAPPERS = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)


def is_transformers_model(model: torch.nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def savable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors as they go on disk: tied weights once, as transformers expects them."""
    state = model.state_dict()
    if is_transformers_model(model):
        # transformers decides which name of a tied pair it expects on reload; ask it.
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        return remove_tied_weights_from_state_dict(dict(state), model)  # type: ignore[arg-type]
    return drop_aliases(state)[0]


def drop_aliases(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Keep one name per shared storage (the first in sorted order); return the dropped aliases."""
    groups: dict[Any, list[str]] = collections.defaultdict(list)
    for name, t in state.items():
        groups[_storage_key(name, t)].append(name)
    aliases = {}
    for names in groups.values():
        kept, *dropped = sorted(names)
        aliases.update({d: kept for d in dropped})
    return {k: v for k, v in state.items() if k not in aliases}, aliases


def _storage_key(name: str, t: torch.Tensor) -> Any:
    """Tensors with the same key share their memory. A DTensor (FSDP2) has no storage of its own: its
    local shard's is used; an empty shard shares nothing."""
    from torch.distributed.tensor import DTensor

    local = t.to_local() if isinstance(t, DTensor) else t
    if local.numel() == 0:
        return name
    return (local.device, local.untyped_storage().data_ptr(), local.storage_offset(), tuple(t.shape))


def write_model_files(
    model: torch.nn.Module,
    staged: StagedDir,
    *,
    tokenizer: Any = None,
    max_shard_size: int | str = "5GB",
    dtype: str | torch.dtype | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> str:
    """Write the model (and tokenizer) files into `staged`; return the manifest kind ("model" or "module").

    `state` may hold a snapshot of the model's savable tensors (async saves) to write instead of the
    live ones.
    """
    model = unwrap_model(model)
    target = parse_dtype(dtype)
    if state is None:
        state = savable_state_dict(model)
    # transformers' index also records the parameter count; keep the index identical to its own.
    counts = {"total_parameters": model.num_parameters()} if is_transformers_model(model) else {}  # type: ignore[operator]
    write_weights(
        hub_state(model, state), staged, max_shard_size=max_shard_size, dtype=target, index_metadata=counts
    )
    if is_transformers_model(model):
        write_config(model, staged, target)
        kind = "model"
    else:
        staged.write_bytes(MODULE_INFO_NAME, _module_info(model, state))
        kind = "module"
    if tokenizer is not None:
        with _foreign_writes(staged, "the tokenizer's files"):
            tokenizer.save_pretrained(staged.path)
    staged.record_unlisted()
    return kind


def hub_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """`state` (the model's savable tensors) under the names and shapes transformers saves them with."""
    layout = plan_hub_layout(model, state) if is_transformers_model(model) else None
    return state if layout is None else HubTensors(layout, state)


@contextlib.contextmanager
def _foreign_writes(staged: StagedDir, what: str) -> Iterator[None]:
    """Errors of files transformers writes for us become StorageErrors like our own writes'."""
    try:
        yield
    except OSError as exc:
        raise storage_error(exc, staged.path, f"writing {what} into") from exc


def write_weights(
    state: Mapping[str, torch.Tensor],
    staged: StagedDir,
    *,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
    prefix: str = "",
    progress: Callable[[str, int, int], None] | None = None,
    index_metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write tensors as one file or transformers-style shards plus index, cast to `dtype` if given.

    Only one shard's cast tensors are alive at a time; `progress(filename, done, total)` is called
    after each shard.
    """

    def out_dtype(t: torch.Tensor) -> torch.dtype:
        return dtype if dtype is not None and t.dtype.is_floating_point else t.dtype

    if isinstance(state, HubTensors):  # converted on access: the layout plans the shards as transformers does
        split = state.layout.split(max_shard_size=max_shard_size, dtype=dtype)
    else:
        # Split on shape-only tensors of the target dtype, so shard sizes are those written to disk.
        planned = {
            k: torch.empty(tuple(v.shape), dtype=out_dtype(v), device="meta") for k, v in state.items()
        }
        split = split_torch_state_dict_into_shards(
            planned, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
        )
    # Shapes and dtypes without touching a tensor (HubTensors converts on access).
    specs: Mapping[str, torch.Tensor] = state.layout.meta if isinstance(state, HubTensors) else state
    total = len(split.filename_to_tensors)
    for done, (filename, names) in enumerate(split.filename_to_tensors.items(), start=1):
        with staged.create(prefix + filename) as out:
            # One tensor cast, converted or materialised (DeepSpeed's lazy gathered weights) at a time: the
            # header needs only dtypes and shapes, so no shard-sized copy of the model is ever built.
            layout = {n: (out_dtype(specs[n]), tuple(specs[n].shape)) for n in names}
            write_streamed(out, layout, lambda n: _to_write(state[n], out_dtype), {"format": "pt"})
        if progress is not None:
            progress(filename, done, total)
    if split.is_sharded:
        index = {
            "metadata": {**(index_metadata or {}), **split.metadata},
            "weight_map": dict(sorted(split.tensor_to_filename.items())),
        }
        staged.write_bytes(prefix + WEIGHTS_INDEX_NAME, json.dumps(index, indent=2).encode())


def _to_write(t: torch.Tensor, out_dtype: Callable[[torch.Tensor], torch.dtype]) -> torch.Tensor:
    # One access per tensor: HubTensors converts on access.
    return t.contiguous().to(out_dtype(t))


def write_config(model: torch.nn.Module, staged: StagedDir, dtype: torch.dtype | None) -> None:
    config: Any = copy.deepcopy(model.config)
    # FSDP2's fully_shard swaps in a class named FSDP<Model>; transformers strips the prefix the same way.
    config.architectures = [type(model).__name__.removeprefix("FSDP")]
    saved_dtype = dtype or next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if saved_dtype is not None:
        config.dtype = str(saved_dtype).removeprefix("torch.")
    generation_config = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", lambda: False)()
    with _foreign_writes(staged, "config.json and generation_config.json"):
        config.save_pretrained(staged.path)
        if generation_config is not None and can_generate:
            generation_config.save_pretrained(staged.path)


def _module_info(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bytes:
    _, aliases = drop_aliases(model.state_dict())
    info = {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "num_tensors": len(state),
        "aliases": aliases,
    }
    return json.dumps(info, indent=2).encode()


# ---------------------------------------------------------------- reading


def weight_files(ckpt_dir: str, manifest: Manifest, prefix: str = "") -> list[str]:
    """The safetensors files holding the model's weights, from the (verified) index if sharded."""
    index_rel = prefix + WEIGHTS_INDEX_NAME
    if index_rel in manifest.files:
        raw = read_bytes_verified(ckpt_dir, manifest, index_rel, max_bytes=MAX_JSON_BYTES)  # checked as read
        weight_map = read_index(ckpt_dir, index_rel, raw=raw)
        return sorted({prefix + f for f in weight_map.values()})
    if prefix + WEIGHTS_NAME in manifest.files:
        return [prefix + WEIGHTS_NAME]
    raise CorruptCheckpointError(
        ckpt_dir,
        [Problem(prefix + WEIGHTS_NAME, "no model weights listed in the manifest (neither file nor index)")],
    )


def read_index(
    model_dir: str, index_rel: str = WEIGHTS_INDEX_NAME, *, raw: bytes | None = None
) -> dict[str, str]:
    """The `weight_map` of a safetensors index (`raw`: its bytes, already read and checked), refusing
    entries that leave the directory."""

    def fail(reason: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(model_dir, [Problem(index_rel, reason)])

    doc = read_json_inside(model_dir, index_rel, fail) if raw is None else parse_json(raw, fail)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CorruptCheckpointError(
            model_dir, [Problem(index_rel, "'weight_map' must map tensor names to file names")]
        )
    for filename in set(weight_map.values()):
        resolve_inside(model_dir, os.path.join(os.path.dirname(index_rel), filename))
    return weight_map


@dataclass
class ModelTargets:
    """Where a checked checkpoint's tensors go: the model's own tensors, under in-memory names, and the
    Hub layout to convert the files from (None when the files hold the in-memory names)."""

    tensors: dict[str, torch.Tensor]
    layout: HubLayout | None = None


def check_model_files(
    model: torch.nn.Module, ckpt_dir: str, manifest: Manifest, prefix: str = ""
) -> tuple[list[str], ModelTargets]:
    """Verify a checkpoint's weight files and check they fit `model`; change nothing.

    Returns the files and where their tensors go, for `copy_model_files`.
    """
    files = weight_files(ckpt_dir, manifest, prefix)
    verify_files(ckpt_dir, manifest, files)
    model = unwrap_model(model)
    expected = savable_state_dict(model)
    layout, mismatches = match_model_files(model, expected, read_headers(ckpt_dir, files))
    if mismatches:
        raise IncompatibleCheckpointError(
            f"the model does not match checkpoint {ckpt_dir}; nothing was loaded. Build the model with the "
            "checkpoint's config (config.json), or restore into the architecture it was saved from:",
            mismatches=mismatches,
        )
    return files, ModelTargets(expected, layout)


def read_headers(ckpt_dir: str, files: list[str]) -> dict[str, tuple[str, list[int]]]:
    """name -> (dtype, shape) over all weight files; a tensor stored twice is a CorruptCheckpointError."""
    found: dict[str, tuple[str, list[int]]] = {}
    duplicates = []
    for rel in files:
        header = read_header(os.path.join(ckpt_dir, rel), checkpoint=ckpt_dir, relpath=rel)
        duplicates += [
            Problem(rel, f"tensor {k!r} is stored in more than one weight file")
            for k in header.keys() & found.keys()
        ]
        found.update(header)
    if duplicates:
        raise CorruptCheckpointError(ckpt_dir, duplicates)
    return found


def match_model_files(
    model: torch.nn.Module, expected: dict[str, torch.Tensor], found: Mapping[str, tuple[str, list[int]]]
) -> tuple[HubLayout | None, list[str]]:
    """How files holding `found` map onto the model's `expected` tensors: the Hub layout to convert
    from (or None), and what does not fit. `expected` may be meta tensors (a sharded model's shapes)."""
    # Checkpoints hold the Hub's layout; older savepoint versions wrote the in-memory one, which loads as is.
    layout = plan_hub_layout(model, expected) if found.keys() != expected.keys() else None
    mismatches = _compare(layout.meta if layout else expected, dict(found))
    if layout is not None and not mismatches:
        layout.check_round_trip(expected)
    return layout, mismatches


def iter_model_parts(
    ckpt_dir: str,
    files: list[str],
    layout: HubLayout | None,
    read: Callable[[str], dict[str, torch.Tensor]] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """The weight files' tensors under the model's in-memory names: file by file, or, converting from
    the Hub layout, group by group as each group's tensors have been read. `read(relpath)` gives a
    file's tensors (default: read from `ckpt_dir`; a restore passes the files it already read)."""
    loader = HubLoader(layout) if layout is not None else None
    for rel in files:
        if read is not None:
            tensors = read(rel)
        else:
            tensors = read_safetensors(os.path.join(ckpt_dir, rel), checkpoint=ckpt_dir, relpath=rel)
        if loader is None:
            yield tensors
            continue
        for name in list(tensors):
            part = loader.put(name, tensors.pop(name))
            if part is not None:
                yield part
    if loader is not None:
        loader.finish()


def copy_model_files(
    ckpt_dir: str,
    files: list[str],
    targets: ModelTargets,
    read: Callable[[str], dict[str, torch.Tensor]] | None = None,
) -> None:
    """Copy checked weight files into the model's tensors in place, one file (or group) in memory at a time."""
    with torch.no_grad():
        for part in iter_model_parts(ckpt_dir, files, targets.layout, read):
            for name, tensor in part.items():
                targets.tensors[name].copy_(tensor)


def load_model_files(model: torch.nn.Module, ckpt_dir: str, manifest: Manifest, prefix: str = "") -> None:
    """Copy a checkpoint's weights into `model`; nothing changes unless every file and shape checks out."""
    copy_model_files(ckpt_dir, *check_model_files(model, ckpt_dir, manifest, prefix))


def _compare(expected: dict[str, torch.Tensor], found: dict[str, tuple[str, list[int]]]) -> list[str]:
    out = [f"missing in checkpoint: {k}" for k in sorted(expected.keys() - found.keys())]
    out += [f"unexpected in checkpoint: {k}" for k in sorted(found.keys() - expected.keys())]
    for key in sorted(expected.keys() & found.keys()):
        shape = list(expected[key].shape)
        dtype = DTYPE_NAMES.get(expected[key].dtype)
        if found[key][1] != shape:
            out.append(f"shape of {key}: checkpoint {found[key][1]}, model {shape}")
        elif found[key][0] != dtype:
            # copy_ would cast silently, and a resume in another precision is not the run that was saved
            out.append(
                f"dtype of {key}: checkpoint {found[key][0]}, model {dtype} (build the model in the saved dtype)"
            )
    return out
