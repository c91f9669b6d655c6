"""Check a merge plan against a base's tensor names, shapes and dtypes before anything is written.

A wrong base shows up here as targets missing from the base or shapes that do not fit; both are
refused with every offending name listed, so nothing half-merged is ever produced.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from savepoint.errors import IncompatibleCheckpointError, MergeError
from savepoint.lora.adapter import LoraEdit, MergePlan
from savepoint.lora.base import TensorInfo


def check_plan(plan: MergePlan, infos: Mapping[str, TensorInfo], model_config: Mapping[str, Any]) -> None:
    """Raise IncompatibleCheckpointError (wrong base) or MergeError (cannot merge); set orientations."""
    missing = sorted(k for k in [*plan.weights, *plan.replace] if k not in infos)
    if missing:
        hint = "the adapter was trained on another base model; pass the base it was trained on"
        if model_config.get("tie_word_embeddings", True):
            hint += (
                ". This base ties its output embedding to the input embedding, so a LoRA or modules_to_save "
                "on the tied head has no weight of its own to merge into; untie the head before training"
            )
        raise IncompatibleCheckpointError(f"adapter keys not in the base ({hint}):", mismatches=missing)
    _check_lora_bias(plan, infos)
    problems: list[str] = []
    for key, edit in plan.weights.items():
        problems += _check_weight(
            key, edit, infos[key], default_transposed=bool(plan.config.get("fan_in_fan_out"))
        )
    for key, edit in plan.biases.items():
        out = edit.b.shape[0] if edit.b is not None else -1
        if infos[key].shape != (out,):
            problems.append(f"{key}: base bias has shape {infos[key].shape}, lora_B.bias needs ({out},)")
    for key, tensor in plan.replace.items():
        if tuple(tensor.shape) != infos[key].shape:
            problems.append(
                f"{key}: modules_to_save copy has shape {tuple(tensor.shape)}, base has {infos[key].shape}"
            )
    if problems:
        raise IncompatibleCheckpointError(
            "the adapter does not fit this base (wrong base?):", mismatches=problems
        )


def _check_weight(key: str, edit: LoraEdit, info: TensorInfo, *, default_transposed: bool) -> list[str]:
    if not info.dtype.is_floating_point or info.dtype.itemsize < 2:
        raise MergeError(
            f"{key} is stored as {info.dtype} (quantized?); savepoint merges into float weights only"
        )
    assert edit.a is not None and edit.b is not None  # build_plan guarantees both
    out_f, in_f = int(edit.b.shape[0]), int(edit.a.shape[1])
    if edit.embedding:
        want: tuple[int, ...] = (in_f, out_f)  # (num_embeddings, dim)
        if info.shape != want:
            return [f"{key}: base embedding {info.shape}, adapter expects {want}"]
        mag = (out_f,)
    else:
        plain, flipped = info.shape == (out_f, in_f), info.shape == (in_f, out_f)
        if not (plain or flipped):
            return [f"{key}: base weight {info.shape}, adapter expects ({out_f}, {in_f}) or its transpose"]
        # Only a square weight is ambiguous; there the config's fan_in_fan_out says how it is stored.
        edit.transposed = flipped and (not plain or default_transposed)
        mag = (out_f,)
    problems = []
    if edit.magnitude is not None and tuple(edit.magnitude.shape) != mag:
        problems.append(f"{key}: DoRA magnitude has shape {tuple(edit.magnitude.shape)}, expected {mag}")
    if edit.base_override is not None and tuple(edit.base_override.shape) != info.shape:
        problems.append(
            f"{key}: saved base_layer weight has shape {tuple(edit.base_override.shape)}, base has {info.shape}"
        )
    return problems


def _check_lora_bias(plan: MergePlan, infos: Mapping[str, TensorInfo]) -> None:
    for key, edit in plan.weights.items():
        if edit.bias is not None and f"{edit.module}.bias" not in infos:
            raise MergeError(
                f"{key}: the adapter has lora_bias but the base layer has no bias to merge it into"
            )
