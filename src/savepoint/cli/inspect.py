"""`savepoint inspect PATH`: what a checkpoint, model directory, adapter or safetensors file holds.

Trust comes first. In a savepoint checkpoint every file is checksummed against the manifest before
anything in it is parsed, and a file that fails is listed but never opened. A plain Hugging Face
directory (no manifest) has nothing to verify against, so only safetensors headers and the adapter's
JSON config are read there; safetensors parses headers without running code.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterable, Mapping
from typing import Any

import typer
from rich.table import Table

from savepoint._json import MAX_JSON_BYTES, read_json_inside
from savepoint.cli.app import app, console
from savepoint.cli.ls import format_metric, human_size, human_time
from savepoint.cli.render import markup, text
from savepoint.discovery import STEP_DIR, is_checkpoint_dir
from savepoint.errors import CheckpointNotFoundError, CorruptCheckpointError, Problem, SavepointError
from savepoint.formats import state as state_codec
from savepoint.formats.safetensors_io import DTYPE_NAMES, read_header
from savepoint.io.files import DIRECTORY, read_bytes_inside, walk_inside
from savepoint.manifest import Manifest, find_problems, read_manifest, resolve_inside
from savepoint.storage.local import MANIFEST_NAME, TMP_PREFIX

DEFAULT_TENSOR_LIMIT = 25
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAIN_STATE = "train_state/"
_ITEMSIZE = {name: dtype.itemsize for dtype, name in DTYPE_NAMES.items()} | {"F8_E8M0": 1}
_MODEL_DIR_MARKERS = ("config.json", ADAPTER_CONFIG, "model.safetensors", "model.safetensors.index.json")
_RANK_FILE = re.compile(r"^train_state/rng/rank-(\d+)\.json$")
_STATEFUL_FILE = re.compile(r"^train_state/stateful/([^/]+)\.json$")


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
        out["model"] = _model_summary(_read_json(path, "config.json"))
    if ADAPTER_CONFIG in rels:
        out["adapter"] = _adapter_summary(path, weights_ok=ADAPTER_WEIGHTS in rels)
    if with_state:
        out["train_state"] = _train_state_summary([r for r in rels if r.startswith(TRAIN_STATE)], path)
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


def _read_json(root: str, rel: str) -> Any:
    """A JSON file below `root` as data, or None when it is unreadable, unsafe or not valid JSON
    (inspect reports, it does not fail)."""
    try:
        return read_json_inside(
            root, rel, lambda reason: CorruptCheckpointError(root, [Problem(rel, reason)])
        )
    except SavepointError:
        return None


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


# ---------------------------------------------------------------- adapter


def _adapter_summary(path: str, *, weights_ok: bool) -> dict[str, Any]:
    """The LoRA adapter's rank, alpha, targets and variant flags."""
    if weights_ok:
        try:
            from savepoint.lora.adapter import describe_adapter
        except ImportError:
            pass
        else:
            try:
                return describe_adapter(path)
            except (SavepointError, ValueError, TypeError, OSError) as exc:
                return {"error": str(exc)}
    # Without the LoRA module, or when the weights are damaged: what the config alone says.
    config = _read_json(path, ADAPTER_CONFIG)
    if not isinstance(config, dict):
        return {"error": f"{ADAPTER_CONFIG} is not a JSON object"}
    keys = ("peft_type", "base_model_name_or_path", "r", "lora_alpha", "target_modules", "modules_to_save")
    info = {k: config.get(k) for k in keys}
    info.update(
        {flag: bool(config.get(flag)) for flag in ("use_rslora", "use_dora", "lora_bias", "fan_in_fan_out")}
    )
    return info


# ---------------------------------------------------------------- training state


def _plain(value: Any) -> Any:
    """A hyperparameter as plain JSON: tuples unwrapped, tensor references shown as "<tensor>"."""
    if isinstance(value, dict):
        if "__tuple__" in value:
            return [_plain(v) for v in value["__tuple__"]]
        if "__tensor__" in value or "__ndarray__" in value:
            return "<tensor>"
        if "__float__" in value:
            return value["__float__"]
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _blob_state(rels: list[str], rel: str, root: str) -> Any:
    """The decoded-to-JSON `state` of a blob (tensors stay references), or None when absent/odd."""
    if rel not in rels:
        return None
    try:
        raw = read_bytes_inside(root, rel, max_bytes=MAX_JSON_BYTES)
        doc = state_codec.loads(raw, ckpt="", relpath=rel)
    except (OSError, CorruptCheckpointError):
        return None
    return doc.get("state") if isinstance(doc, dict) else None


def _optimizer_summary(state: Any) -> dict[str, Any] | None:
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not isinstance(groups, list):
        return None
    summary = []
    for group in groups:
        if not isinstance(group, dict):
            continue
        params = group.get("params")
        hyper = {k: _plain(v) for k, v in group.items() if k != "params" and k in _SHOWN_HYPERPARAMS}
        summary.append({"params": len(params) if isinstance(params, list) else 0, **hyper})
    per_param = state.get("state")
    return {
        "groups": summary,
        "params": sum(g["params"] for g in summary),
        "params_with_state": len(per_param) if isinstance(per_param, dict) else 0,
    }


_SHOWN_HYPERPARAMS = ("lr", "betas", "momentum", "eps", "weight_decay", "initial_lr")


def _scheduler_summary(state: Any) -> dict[str, Any] | None:
    if not isinstance(state, dict):
        return None
    keys = ("last_epoch", "_step_count", "base_lrs", "_last_lr")
    return {k.lstrip("_"): _plain(state[k]) for k in keys if k in state}


def _is_known_state_file(rel: str) -> bool:
    name = rel.removeprefix(TRAIN_STATE)
    blobs = {
        f"{base}.{ext}" for base in ("optimizer", "scheduler", "extra") for ext in ("json", "safetensors")
    }
    return name in blobs or name.startswith(("rng/", "stateful/"))


def _train_state_summary(rels: list[str], root: str) -> dict[str, Any]:
    """Which training-state pieces a checkpoint holds, with a few numbers each."""
    ranks = sorted(int(m.group(1)) for r in rels if (m := _RANK_FILE.match(r)))
    stateful = sorted(m.group(1) for r in rels if (m := _STATEFUL_FILE.match(r)))
    rng_state = _blob_state(rels, f"train_state/rng/rank-{ranks[0]:05d}.json", root) if ranks else None
    extra = _blob_state(rels, "train_state/extra.json", root)
    return {
        "optimizer": _optimizer_summary(_blob_state(rels, "train_state/optimizer.json", root)),
        "scheduler": _scheduler_summary(_blob_state(rels, "train_state/scheduler.json", root)),
        "stateful": stateful,
        "rng_ranks": ranks,
        "rng_generators": sorted(rng_state) if isinstance(rng_state, dict) else [],
        "extra_keys": sorted(extra) if isinstance(extra, dict) else None,
        "other_files": sorted(r for r in rels if not _is_known_state_file(r)),
    }


# ---------------------------------------------------------------- rendering


def _kv_table(items: Mapping[str, Any]) -> Table:
    table = Table(show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in items.items():
        table.add_row(text(key), text(value if isinstance(value, str) else json.dumps(value)))
    return table


def _manifest_items(m: Mapping[str, Any]) -> dict[str, Any]:
    items: dict[str, Any] = {
        "kind": m["kind"],
        "step": str(m["step"]) if m["step"] is not None else "-",
        "created": human_time(m["created"]),
        "size": human_size(m["total_size"]),
    }
    items["metrics"] = ", ".join(f"{k}={format_metric(v)}" for k, v in m["metrics"].items()) or "-"
    items["parent"] = m["parent"] or "-"
    items["world size"] = str(m["world_size"])
    items["format version"] = str(m["format_version"])
    items["versions"] = ", ".join(f"{k} {v}" for k, v in m["versions"].items()) or "-"
    if m["base_model"]:
        items["base model"] = m["base_model"]
    return items


def _files_table(files: list[dict[str, Any]]) -> Table:
    table = Table()
    table.add_column("path", overflow="fold")
    table.add_column("size", justify="right")
    table.add_column("checksum")
    table.add_column("status", overflow="fold")
    for f in files:
        status = text("ok", "green") if f["status"] == "ok" else text(f["status"], "red")
        size = human_size(f["size"]) if f["size"] is not None else ""
        table.add_row(text(f["path"]), size, text((f["checksum"] or "-")[:12]), status)
    return table


def _tensors_table(rows: list[dict[str, Any]], limit: int | None) -> Table:
    table = Table()
    table.add_column("name", overflow="fold")
    table.add_column("dtype")
    table.add_column("shape")
    table.add_column("bytes", justify="right")
    shown = rows if limit is None else rows[:limit]
    for r in shown:
        nbytes = human_size(r["bytes"]) if r["bytes"] is not None else "?"
        table.add_row(text(r["name"]), text(r["dtype"]), text(tuple(r["shape"])), nbytes)
    if len(shown) < len(rows):
        table.add_row(f"[dim]... and {len(rows) - len(shown)} more (--all shows every tensor)[/]", "", "", "")
    return table


def _tensors_title(rel: str, rows: list[dict[str, Any]]) -> str:
    numel = sum(r["numel"] for r in rows)
    nbytes = sum(r["bytes"] or 0 for r in rows)
    return f"{markup(rel)}: {len(rows)} tensors, {numel:,} elements, {human_size(nbytes)}"


def _train_state_items(ts: Mapping[str, Any]) -> dict[str, Any]:
    items: dict[str, Any] = {}
    opt = ts["optimizer"]
    if opt is not None:
        items["optimizer"] = (
            f"{len(opt['groups'])} group(s), {opt['params']} parameters ({opt['params_with_state']} with state)"
        )
        for k, group in enumerate(opt["groups"]):
            items[f"  group {k}"] = ", ".join(f"{key}={json.dumps(v)}" for key, v in group.items())
    if ts["scheduler"] is not None:
        items["scheduler"] = (
            ", ".join(f"{k}={json.dumps(v)}" for k, v in ts["scheduler"].items()) or "present"
        )
    items["stateful"] = ", ".join(ts["stateful"]) or "-"
    items["rng ranks"] = ", ".join(map(str, ts["rng_ranks"])) or "-"
    if ts["rng_generators"]:
        items["rng generators"] = ", ".join(ts["rng_generators"])
    if ts["extra_keys"] is not None:
        items["extra"] = ", ".join(ts["extra_keys"]) or "(empty)"
    if ts["other_files"]:
        items["other files"] = ", ".join(ts["other_files"])
    return items


def render_report(report: Mapping[str, Any], *, limit: int | None = DEFAULT_TENSOR_LIMIT) -> None:
    """Print an `inspect_path` report as rich tables."""
    console.print(f"[bold]{markup(report['path'])}[/]: {markup(report['layout'])}", highlight=False)
    if "manifest" in report:
        _section("manifest", _kv_table(_manifest_items(report["manifest"])))
    if report.get("model"):
        _section("model config", _kv_table(report["model"]))
    if "adapter" in report:
        _section("LoRA adapter", _kv_table(report["adapter"]))
    if report.get("train_state"):
        _section("training state", _kv_table(_train_state_items(report["train_state"])))
    _section("files", _files_table(report["files"]))
    for rel, rows in report["tensors"].items():
        _section(_tensors_title(rel, rows), _tensors_table(rows, limit))
    for p in report["problems"]:
        console.print(
            f"[red]{markup(p['path'])}: {markup(p['reason'])}[/] (not parsed)",
            highlight=False,
            soft_wrap=True,
        )


def _section(title: str, table: Table) -> None:
    # Titles go on their own line: a rich table title would wrap at the (narrow) table's width.
    console.print(f"\n[bold cyan]{title}[/]", highlight=False, soft_wrap=True)
    console.print(table)


@app.command("inspect")
def inspect_command(
    path: str = typer.Argument(
        ..., help="A checkpoint, a model or adapter directory, or a .safetensors file."
    ),
    show_all: bool = typer.Option(
        False, "--all", help=f"Show every tensor (default: the first {DEFAULT_TENSOR_LIMIT} per file)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (always every tensor) instead of tables."),
) -> None:
    """Show what a checkpoint holds: manifest, files, tensors, training state, LoRA adapter.

    In a savepoint checkpoint every file is checksummed before it is read; damaged files are listed
    and skipped, and the exit status is 1. A directory without a manifest gets headers only.
    """
    report = inspect_path(path)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        render_report(report, limit=None if show_all else DEFAULT_TENSOR_LIMIT)
    if report["problems"]:
        raise typer.Exit(1)
