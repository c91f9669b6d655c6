"""What `savepoint inspect` says about a LoRA adapter and a checkpoint's training state.

Called only on files that verified against the manifest (or, for an adapter config in a plain
directory, on JSON read below that directory with a size cap): nothing here unpickles or runs code.
"""

from __future__ import annotations

import re
from typing import Any

from savepoint._json import MAX_JSON_BYTES, read_json_inside
from savepoint.errors import CorruptCheckpointError, Problem, SavepointError
from savepoint.formats import state as state_codec
from savepoint.io.files import read_bytes_inside

ADAPTER_CONFIG = "adapter_config.json"
TRAIN_STATE = "train_state/"
_RANK_FILE = re.compile(r"^train_state/rng/rank-(\d+)\.json$")
_STATEFUL_FILE = re.compile(r"^train_state/stateful/([^/]+)\.json$")


def read_json(root: str, rel: str) -> Any:
    """A JSON file below `root` as data, or None when it is unreadable, unsafe or not valid JSON
    (inspect reports, it does not fail)."""
    try:
        return read_json_inside(
            root, rel, lambda reason: CorruptCheckpointError(root, [Problem(rel, reason)])
        )
    except SavepointError:
        return None


# ---------------------------------------------------------------- adapter


def adapter_summary(path: str, *, weights_ok: bool) -> dict[str, Any]:
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
    config = read_json(path, ADAPTER_CONFIG)
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


def train_state_summary(rels: list[str], root: str) -> dict[str, Any]:
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
