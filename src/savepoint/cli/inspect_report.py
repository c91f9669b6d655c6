"""`savepoint inspect`'s report: what a checkpoint, model directory, adapter or safetensors file holds,
as a JSON-ready dict (the tables and `--json` both come from it).

Trust comes first. In a savepoint checkpoint every file is checksummed against the manifest before
anything in it is parsed, and a file that fails is listed but never opened. A plain Hugging Face
directory (no manifest) has nothing to verify against, so only safetensors headers and the adapter's
JSON config are read there; safetensors parses headers without running code.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Mapping
from typing import Any

from savepoint.cli.inspect_state import (
    ADAPTER_CONFIG,
    TRAIN_STATE,
    adapter_summary,
    read_json,
    train_state_summary,
)
from savepoint.discovery import STEP_DIR, is_checkpoint_dir
from savepoint.errors import CheckpointNotFoundError, CorruptCheckpointError, Problem, SavepointError
from savepoint.formats.safetensors_io import DTYPE_NAMES, read_header
from savepoint.io.files import DIRECTORY, walk_inside
from savepoint.manifest import Manifest, find_problems, read_manifest, resolve_inside
from savepoint.storage.local import MANIFEST_NAME, TMP_PREFIX

ADAPTER_WEIGHTS = "adapter_model.safetensors"
_ITEMSIZE = {name: dtype.itemsize for dtype, name in DTYPE_NAMES.items()} | {"F8_E8M0": 1}
_MODEL_DIR_MARKERS = ("config.json", ADAPTER_CONFIG, "model.safetensors", "model.safetensors.index.json")


# ---------------------------------------------------------------- building the report


def inspect_path(path: str) -> dict[str, Any]:
    """Everything `inspect` shows, as a JSON-ready dict (the table and `--json` both come from it)."""
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"{path} does not exist; check the path")
    if os.path.isfile(path):
        return _inspect_safetensors_file(path)
    if is_checkpoint_dir(path):
        try:
            manifest = read_manifest(path)
        except CorruptCheckpointError as exc:
            return _inspect_unverifiable(path, exc.problems)
        return _inspect_checkpoint(path, manifest)
    if _looks_like_savepoint_dir(path):
        missing = Problem(
            MANIFEST_NAME, "missing: not a committed checkpoint (an interrupted or damaged save)"
        )
        return _inspect_unverifiable(path, [missing])
    return _inspect_plain_dir(path)


def _looks_like_savepoint_dir(path: str) -> bool:
    """A step directory or staging directory of savepoint's, or one holding training state."""
    name = os.path.basename(os.path.normpath(path))
    return (
        bool(STEP_DIR.match(name))
        or name.startswith(TMP_PREFIX)
        or os.path.isdir(os.path.join(path, TRAIN_STATE))
    )


def _inspect_unverifiable(path: str, problems: list[Problem]) -> dict[str, Any]:
    """A savepoint directory whose manifest is missing or damaged: list its files, parse none of them.

    Without a manifest nothing in it can be checked, and savepoint never reads what it cannot check.
    """
    rels = sorted(_walk_files(path))
    files = [{**_plain_file_row(path, rel), "status": "unverified"} for rel in rels if rel != MANIFEST_NAME]
    return {
        "path": path,
        "layout": "savepoint checkpoint (unverifiable: nothing in it was parsed)",
        "files": files,
        "tensors": {},
        "problems": _problem_dicts(problems),
    }


def _inspect_safetensors_file(path: str) -> dict[str, Any]:
    if not path.endswith(".safetensors"):
        raise SavepointError(
            f"{path} is a file; inspect takes a checkpoint or model directory, or a .safetensors file"
        )
    name = os.path.basename(path)
    tensors = read_header(path, checkpoint=os.path.dirname(path) or ".", relpath=name)
    return {
        "path": path,
        "layout": "safetensors file",
        "files": [{"path": name, "size": os.path.getsize(path), "checksum": None, "status": "ok"}],
        "tensors": {name: _tensor_rows(tensors)},
        "problems": [],
    }


def _inspect_checkpoint(path: str, manifest: Manifest) -> dict[str, Any]:
    """A savepoint checkpoint: verify every file, then parse only those that verified."""
    problems = find_problems(path, manifest)
    damaged = {p.path: p.reason for p in problems}
    trusted = [rel for rel in sorted(manifest.files) if rel not in damaged]
    files = [
        {"path": rel, "size": e.size, "checksum": e.checksum, "status": damaged.get(rel, "ok")}
        for rel, e in sorted(manifest.files.items())
    ]
    files += [
        {"path": p.path, "size": None, "checksum": None, "status": p.reason}
        for p in problems
        if p.path not in manifest.files
    ]
    report: dict[str, Any] = {
        "path": path,
        "layout": "savepoint checkpoint",
        "manifest": _manifest_summary(manifest),
        "files": files,
    }
    parsed, unreadable = _parse_trusted(path, trusted, with_state=True)
    report.update(parsed, problems=_problem_dicts([*problems, *unreadable]))
    return report


def _inspect_plain_dir(path: str) -> dict[str, Any]:
    """A Hugging Face model or PEFT adapter directory without a manifest: headers and configs only."""
    names = os.listdir(path)
    if not any(n in _MODEL_DIR_MARKERS or n.endswith(".safetensors") for n in names):
        raise SavepointError(_not_a_model_dir_message(path, names))
    rels = sorted(_walk_files(path))
    files = [_plain_file_row(path, rel) for rel in rels]
    report: dict[str, Any] = {
        "path": path,
        "layout": "model directory (no savepoint manifest)",
        "files": files,
    }
    # Only regular files are parsed, headers and configs only. Symlinks are listed but not followed:
    # a directory from someone else may link anywhere (a HF cache snapshot links into ../blobs: inspect
    # the files there, or a copy made with `cp -L`).
    regular = [f["path"] for f in files if f["status"] == "ok"]
    parsed, unreadable = _parse_trusted(path, regular, with_state=False)
    skipped = [Problem(f["path"], f["status"]) for f in files if f["status"] != "ok"]
    report.update(parsed, problems=_problem_dicts([*skipped, *unreadable]))
    return report


def _plain_file_row(path: str, rel: str) -> dict[str, Any]:
    size: int | None = None
    try:
        info = os.lstat(os.path.join(path, rel))
    except OSError as exc:  # removed while listed: it must not end the listing
        return {"path": rel, "size": None, "checksum": None, "status": f"unreadable: {exc.strerror}"}
    if stat.S_ISLNK(info.st_mode):
        status = "unreadable: a symbolic link, not followed"
    elif not stat.S_ISREG(info.st_mode):
        status = "unreadable: not a regular file (FIFO, socket, device)"
    else:
        size, status = info.st_size, "ok"
    return {"path": rel, "size": size, "checksum": None, "status": status}


def _not_a_model_dir_message(path: str, names: list[str]) -> str:
    steps = sorted(n for n in names if STEP_DIR.match(n))
    if steps:
        return (
            f"{path} is a run root holding {len(steps)} checkpoint(s); inspect one of them, e.g. "
            f"`savepoint inspect {os.path.join(path, steps[-1])}` (or list them with `savepoint ls {path}`)"
        )
    return f"{path} is not a checkpoint or model directory (no {MANIFEST_NAME}, config.json or safetensors files)"


def _walk_files(path: str) -> Iterable[str]:
    """Every non-directory entry below `path` (symlinks not followed, depth-limited), hidden dirs pruned."""

    def hidden(rel: str) -> bool:  # .cache/ and friends are not the model
        return rel.rsplit("/", 1)[-1].startswith(".")

    for rel, kind in walk_inside(path, skip=hidden):
        if kind != DIRECTORY:
            yield rel


def _parse_trusted(path: str, rels: list[str], *, with_state: bool) -> tuple[dict[str, Any], list[Problem]]:
    """Parse what may be parsed among `rels` (safetensors headers, configs, verified train state).

    Returns the report sections and the files that turned out unparseable.
    """
    out: dict[str, Any] = {"tensors": {}}
    unreadable: list[Problem] = []
    for rel in rels:
        if rel.endswith(".safetensors"):
            try:
                located = resolve_inside(path, rel)  # no symlink, no FIFO on the way
                out["tensors"][rel] = _tensor_rows(read_header(located, checkpoint=path, relpath=rel))
            except CorruptCheckpointError as exc:
                unreadable += exc.problems
    if "config.json" in rels:
        out["model"] = _model_summary(read_json(path, "config.json"))
    if ADAPTER_CONFIG in rels:
        out["adapter"] = adapter_summary(path, weights_ok=ADAPTER_WEIGHTS in rels)
    if with_state:
        out["train_state"] = train_state_summary([r for r in rels if r.startswith(TRAIN_STATE)], path)
    return out, unreadable


def _problem_dicts(problems: Iterable[Problem]) -> list[dict[str, str]]:
    return [{"path": p.path, "reason": p.reason} for p in problems]


def _natural_key(name: str) -> list[Any]:
    """Sort `layers.2` before `layers.10`: digit runs compare as numbers."""
    return [(0, int(t)) if t.isdigit() else (1, t) for t in re.split(r"(\d+)", name)]


def _tensor_rows(header: Mapping[str, tuple[str, list[int]]]) -> list[dict[str, Any]]:
    rows = []
    for name in sorted(header, key=_natural_key):
        dtype, shape = header[name]
        numel = 1
        for dim in shape:
            numel *= dim
        itemsize = _ITEMSIZE.get(dtype)
        rows.append(
            {
                "name": name,
                "dtype": dtype,
                "shape": shape,
                "numel": numel,
                "bytes": numel * itemsize if itemsize is not None else None,
            }
        )
    return rows


def _manifest_summary(manifest: Manifest) -> dict[str, Any]:
    return {
        "kind": manifest.kind,
        "step": manifest.step,
        "created": manifest.created,
        "metrics": dict(manifest.metrics),
        "parent": manifest.parent,
        "world_size": manifest.world_size,
        "format_version": manifest.format_version,
        "versions": dict(manifest.versions),
        "base_model": manifest.base_model,
        "total_size": manifest.total_size,
    }


def _model_summary(config: Any) -> dict[str, Any]:
    if not isinstance(config, dict):
        return {"error": "config.json is not a JSON object"}
    keys = (
        "model_type",
        "architectures",
        "dtype",
        "torch_dtype",
        "hidden_size",
        "num_hidden_layers",
        "vocab_size",
    )
    return {k: config[k] for k in keys if k in config}
