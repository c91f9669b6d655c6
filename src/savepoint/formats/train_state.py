"""Optimizer, scheduler, RNG and stateful objects, captured as state trees and stored as blobs.

A blob is `NAME.json` (the tree, tensors replaced by references) plus `NAME.safetensors` when the
tree holds tensors. Optimizer state is keyed by parameter *name*, not position, so it survives
wrapping (DDP, torch.compile) and refuses to load into a model whose parameters differ.
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from savepoint.errors import (
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    Problem,
    UnsupportedStateError,
)
from savepoint.formats import state as state_codec
from savepoint.formats.hf import unwrap_model
from savepoint.formats.safetensors_io import write_safetensors
from savepoint.manifest import Manifest
from savepoint.storage.local import StagedDir
from savepoint.verified_read import read_bytes_verified, read_safetensors_verified

TRAIN_STATE_DIR = "train_state"
# A state document holds structure and small values (tensors go to safetensors). The cap holds on both
# sides: a save refuses a larger one, so a restore may refuse it unread without losing a checkpoint.
MAX_STATE_JSON_BYTES = 256 * 1024 * 1024


# ---------------------------------------------------------------- blobs


def blob_files(relbase: str) -> tuple[str, str]:
    return f"{relbase}.json", f"{relbase}.safetensors"


def encode_blob(state: Any, where: str) -> tuple[bytes, dict[str, torch.Tensor]]:
    tensors: dict[str, torch.Tensor] = {}
    doc = state_codec.encode(state, tensors, where)
    raw = state_codec.dumps({"state": doc})
    if len(raw) > MAX_STATE_JSON_BYTES:
        raise UnsupportedStateError(
            f"{where}: its JSON document is {len(raw)} bytes, more than the {MAX_STATE_JSON_BYTES} a "
            "restore reads; keep large sequences as tensors or numpy arrays (stored as safetensors)"
        )
    return raw, tensors


def write_blob(staged: StagedDir, relbase: str, doc: bytes, tensors: Mapping[str, torch.Tensor]) -> None:
    json_rel, st_rel = blob_files(relbase)
    staged.write_bytes(json_rel, doc)
    if tensors:
        with staged.create(st_rel) as out:
            write_safetensors(out, tensors)


def has_blob(manifest: Manifest, relbase: str) -> bool:
    return blob_files(relbase)[0] in manifest.files


def read_blob(ckpt_dir: str, manifest: Manifest, relbase: str) -> Any:
    """Read and decode one blob; each file is checked against the manifest in the same read."""
    json_rel, st_rel = blob_files(relbase)
    raw = read_bytes_verified(ckpt_dir, manifest, json_rel, max_bytes=MAX_STATE_JSON_BYTES)
    doc = state_codec.loads(raw, ckpt=ckpt_dir, relpath=json_rel)
    tensors = {}
    if st_rel in manifest.files:
        tensors = read_safetensors_verified(ckpt_dir, manifest, st_rel)
    if not isinstance(doc, dict) or "state" not in doc:
        raise CorruptCheckpointError(ckpt_dir, [Problem(json_rel, "missing the 'state' field")])
    return state_codec.decode(doc["state"], tensors, ckpt=ckpt_dir, relpath=json_rel)


# ---------------------------------------------------------------- optimizer


def _index_to_name(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[int, str]:
    """Map the optimizer's positional parameter indices to the model's parameter names."""
    names = {id(p): n for n, p in unwrap_model(model).named_parameters(remove_duplicate=False)}
    # state_dict() numbers parameters consecutively across groups, in param_groups order.
    out: dict[int, str] = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            if id(param) not in names:
                raise IncompatibleCheckpointError(
                    f"the optimizer holds a parameter of shape {tuple(param.shape)} that is not in the model; "
                    "pass the model that owns every optimized parameter"
                )
            out[len(out)] = names[id(param)]
    return out


def optimizer_state(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, Any]:
    """The optimizer's state_dict with parameter indices replaced by parameter names."""
    to_name = _index_to_name(optimizer, model)
    sd = optimizer.state_dict()
    return {
        "state": {to_name[i]: v for i, v in sd["state"].items()},
        "param_groups": [{**g, "params": [to_name[i] for i in g["params"]]} for g in sd["param_groups"]],
    }


def prepare_optimizer_state(
    optimizer: torch.optim.Optimizer, model: torch.nn.Module, saved: Any, ckpt_dir: str
) -> dict[str, Any]:
    """Map a saved (name-keyed) optimizer state onto `optimizer`'s indices, checking it fits first.

    The result goes to `optimizer.load_state_dict`; nothing is changed here.
    """
    to_name = _index_to_name(optimizer, model)
    to_index = {n: i for i, n in to_name.items()}
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(groups, list) or not isinstance(saved.get("state"), dict):
        raise IncompatibleCheckpointError(f"optimizer state in {ckpt_dir} is malformed")
    current = [sorted(to_name[i] for i in g["params"]) for g in optimizer.state_dict()["param_groups"]]
    stored = [sorted(g.get("params", [])) for g in groups]
    if current != stored:
        mismatches = _group_mismatches(current, stored)
        raise IncompatibleCheckpointError(
            f"the optimizer's parameters differ from those saved in {ckpt_dir}; nothing was loaded:",
            mismatches=mismatches,
        )
    params = [p for g in optimizer.param_groups for p in g["params"]]  # numbered as _index_to_name does
    shapes = {to_name[i]: tuple(p.shape) for i, p in enumerate(params)}
    check_optimizer_moments(saved["state"], shapes, ckpt_dir)
    return {
        "state": {to_index[n]: v for n, v in saved["state"].items() if n in to_index},
        "param_groups": [{**g, "params": [to_index[n] for n in g["params"]]} for g in groups],
    }


def check_optimizer_moments(state: Any, shapes: Mapping[str, tuple[int, ...]], ckpt_dir: str) -> None:
    """Every saved per-parameter state fits its parameter, before `load_state_dict` (which checks none).

    A state tensor must have the parameter's shape, or be the parameter's shape with dimensions left
    out (a scalar step count, a factored second moment as Adafactor keeps), or hold one element.
    """
    if not isinstance(state, dict):
        raise IncompatibleCheckpointError(
            f"optimizer state in {ckpt_dir} is malformed (no per-parameter map)"
        )
    bad = []
    for name, entry in state.items():
        if name not in shapes:
            bad.append(f"state for {name!r:.200}, which is no parameter of the optimizer")
        elif not isinstance(entry, dict):
            bad.append(f"state of {name!r:.200} is not a mapping")
        else:
            for key, value in entry.items():
                if isinstance(value, torch.Tensor) and not _fits(tuple(value.shape), shapes[name]):
                    bad.append(
                        f"{name}.{key}: shape {list(value.shape)} does not fit the parameter's {list(shapes[name])}"
                    )
    if bad:
        raise IncompatibleCheckpointError(
            f"optimizer state in {ckpt_dir} does not fit the optimizer's parameters; nothing was loaded:",
            mismatches=bad,
        )


def _fits(shape: tuple[int, ...], param: tuple[int, ...]) -> bool:
    if shape == param or math.prod(shape) == 1:
        return True
    rest = iter(param)
    return all(any(d == p for p in rest) for d in shape)  # `shape` is `param` with some dims left out


def _group_mismatches(current: list[list[str]], stored: list[list[str]]) -> list[str]:
    if len(current) != len(stored):
        return [f"{len(stored)} parameter group(s) saved, the optimizer has {len(current)}"]
    out = []
    for k, (cur, old) in enumerate(zip(current, stored, strict=True)):
        out += [f"group {k}: saved but not in optimizer: {n}" for n in sorted(set(old) - set(cur))]
        out += [f"group {k}: in optimizer but not saved: {n}" for n in sorted(set(cur) - set(old))]
    return out


# ---------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """Every global RNG a training loop draws from. Reading them consumes nothing."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def check_rng_state(state: Any, ckpt_dir: str, relpath: str) -> None:
    """Decode every RNG state into a throwaway generator, so a bad blob fails before anything changes."""
    try:
        if not isinstance(state, Mapping):
            raise TypeError("not a mapping")
        random.Random().setstate(_as_tuple(state["python"]))
        np.random.RandomState().set_state(_as_tuple(state["numpy"]))
        _check_generator_state(state["torch"], torch.Generator())
        if "cuda" in state and torch.cuda.is_available():
            cuda = state["cuda"]
            if not isinstance(cuda, list | tuple):
                raise TypeError("the CUDA states are not a list")
            for blob in cuda:
                _check_generator_state(blob, torch.Generator(device="cuda"))
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, OverflowError) as exc:
        raise CorruptCheckpointError(
            ckpt_dir, [Problem(relpath, f"RNG state does not decode ({type(exc).__name__}: {exc})"[:300])]
        ) from exc


def _check_generator_state(blob: Any, generator: torch.Generator) -> None:
    if not isinstance(blob, torch.Tensor) or blob.dtype != torch.uint8 or blob.dim() != 1:
        raise TypeError("a generator state must be a 1-D uint8 tensor")
    if blob.numel() != generator.get_state().numel():
        raise ValueError(f"generator state of {blob.numel()} bytes, expected {generator.get_state().numel()}")
    generator.set_state(blob)


def check_scheduler_state(scheduler: Any, saved: Any, ckpt_dir: str) -> None:
    """The saved state has exactly the keys of the scheduler's own `state_dict()`, lists of its lengths."""
    own = scheduler.state_dict()
    if not isinstance(saved, dict):
        raise IncompatibleCheckpointError(
            f"the scheduler state in {ckpt_dir} is not a mapping; nothing was loaded"
        )
    bad = [f"missing in checkpoint: {k}" for k in sorted(own.keys() - saved.keys())]
    bad += [f"unexpected in checkpoint: {k!r:.200}" for k in sorted(map(str, saved.keys() - own.keys()))]
    bad += [
        f"{k}: {len(saved[k]) if isinstance(saved[k], list | tuple) else 'not a list'} entries, "
        f"the scheduler has {len(v)}"
        for k, v in own.items()
        if isinstance(v, list | tuple) and k in saved and not _same_len(saved[k], v)
    ]
    if bad:
        raise IncompatibleCheckpointError(
            f"the scheduler saved in {ckpt_dir} is not of this scheduler's kind; nothing was loaded:",
            mismatches=bad,
        )


def _same_len(saved: Any, own: list[Any] | tuple[Any, ...]) -> bool:
    return isinstance(saved, list | tuple) and len(saved) == len(own)


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    np.random.set_state(_as_tuple(state["numpy"]))
    torch.set_rng_state(state["torch"].to(torch.uint8))
    if "cuda" in state:
        if torch.cuda.is_available():
            saved, count = list(state["cuda"]), torch.cuda.device_count()
            if len(saved) != count:
                warnings.warn(
                    f"the checkpoint holds CUDA RNG states of {len(saved)} GPU(s) and this process sees {count}; "
                    f"the first {min(len(saved), count)} were restored",
                    stacklevel=3,
                )
            for index, blob in enumerate(saved[:count]):
                torch.cuda.set_rng_state(blob, index)
        else:
            warnings.warn(
                "the checkpoint holds CUDA RNG state but no GPU is available; it was not restored",
                stacklevel=3,
            )


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value
