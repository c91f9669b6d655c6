"""Optimizer, scheduler, RNG and stateful objects, captured as state trees and stored as blobs.

A blob is `NAME.json` (the tree, tensors replaced by references) plus `NAME.safetensors` when the
tree holds tensors. Optimizer state is keyed by parameter *name*, not position, so it survives
wrapping (DDP, torch.compile) and refuses to load into a model whose parameters differ.
"""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from savepoint.errors import CorruptCheckpointError, IncompatibleCheckpointError, Problem
from savepoint.formats import state as state_codec
from savepoint.formats.hf import unwrap_model
from savepoint.formats.safetensors_io import read_safetensors, write_safetensors
from savepoint.manifest import Manifest, verify_files
from savepoint.storage.local import StagedDir

TRAIN_STATE_DIR = "train_state"


# ---------------------------------------------------------------- blobs


def blob_files(relbase: str) -> tuple[str, str]:
    return f"{relbase}.json", f"{relbase}.safetensors"


def encode_blob(state: Any, where: str) -> tuple[bytes, dict[str, torch.Tensor]]:
    tensors: dict[str, torch.Tensor] = {}
    doc = state_codec.encode(state, tensors, where)
    return state_codec.dumps({"state": doc}), tensors


def write_blob(staged: StagedDir, relbase: str, doc: bytes, tensors: Mapping[str, torch.Tensor]) -> None:
    json_rel, st_rel = blob_files(relbase)
    staged.write_bytes(json_rel, doc)
    if tensors:
        with staged.create(st_rel) as out:
            write_safetensors(out, tensors)


def has_blob(manifest: Manifest, relbase: str) -> bool:
    return blob_files(relbase)[0] in manifest.files


def read_blob(ckpt_dir: str, manifest: Manifest, relbase: str) -> Any:
    """Verify and decode one blob."""
    json_rel, st_rel = blob_files(relbase)
    needed = [json_rel] + ([st_rel] if st_rel in manifest.files else [])
    verify_files(ckpt_dir, manifest, needed)
    try:
        with open(os.path.join(ckpt_dir, json_rel), "rb") as f:
            raw = f.read()
    except OSError as exc:  # e.g. deleted by retention after it verified (tests/reliability: concurrency)
        raise CorruptCheckpointError(
            ckpt_dir, [Problem(json_rel, f"unreadable ({exc.strerror or exc})")]
        ) from exc
    doc = state_codec.loads(raw, ckpt=ckpt_dir, relpath=json_rel)
    tensors = {}
    if st_rel in manifest.files:
        tensors = read_safetensors(os.path.join(ckpt_dir, st_rel), checkpoint=ckpt_dir, relpath=st_rel)
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
    return {
        "state": {to_index[n]: v for n, v in saved["state"].items() if n in to_index},
        "param_groups": [{**g, "params": [to_index[n] for n in g["params"]]} for g in groups],
    }


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


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    np.random.set_state(_as_tuple(state["numpy"]))
    torch.set_rng_state(state["torch"].to(torch.uint8))
    if "cuda" in state:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state_all(list(state["cuda"]))
        else:
            warnings.warn(
                "the checkpoint holds CUDA RNG state but no GPU is available; it was not restored",
                stacklevel=3,
            )


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value
