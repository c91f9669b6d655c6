"""peft `PeftModel`s in checkpoints: the adapter in PEFT's own layout, and the base it belongs to.

A LoRA checkpoint holds `adapter_config.json` and `adapter_model.safetensors` exactly as peft's
`save_pretrained` writes them (so `PeftModel.from_pretrained(base, ckpt_dir)` loads it), never the
frozen base; the manifest's `base_model` names the base and fingerprints its weights instead.

    >>> info = write_adapter_files(peft_model, staged)  # doctest: +SKIP
    >>> load_adapter_into(peft_model, "runs/x/step-00000100", info)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import torch

from savepoint.errors import IncompatibleCheckpointError
from savepoint.formats.safetensors_io import write_safetensors
from savepoint.lora.adapter import CONFIG_NAME, WEIGHTS_NAME
from savepoint.lora.fingerprint import fingerprint_model
from savepoint.manifest import Manifest, read_manifest
from savepoint.storage.local import StagedDir
from savepoint.verified_read import read_safetensors_verified


def is_peft_model(model: object) -> bool:
    """True for a peft `PeftModel` (checked without importing peft when it is not loaded)."""
    import sys

    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def trainable_named_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters a LoRA run trains (adapter weights, modules_to_save copies), by name."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def adapter_config_json(model: Any, adapter_name: str) -> bytes:
    """The adapter_config.json peft writes: its to_dict(), inference_mode on, sorted, indent 2."""
    config = model.peft_config[adapter_name]
    doc = config.to_dict()
    doc["inference_mode"] = True
    if not doc.get("base_model_name_or_path"):
        doc["base_model_name_or_path"] = getattr(model.get_base_model(), "name_or_path", None) or None
    doc = {k: list(v) if isinstance(v, set) else v for k, v in doc.items()}
    return json.dumps(doc, indent=2, sort_keys=True, default=list).encode()


def adapter_states(model: Any) -> dict[str, dict[str, torch.Tensor]]:
    """adapter name -> the tensors peft saves for it (live references, not copies)."""
    from peft.utils import get_peft_model_state_dict

    return {name: get_peft_model_state_dict(model, adapter_name=name) for name in model.peft_config}


def write_adapter_files(
    model: Any, staged: StagedDir, *, states: dict[str, dict[str, torch.Tensor]] | None = None
) -> dict[str, Any]:
    """Write every adapter of `model` as peft does (`default` at the top, others in a subdirectory
    named after them) and return the manifest's `base_model`: name or path, and weights fingerprint.

    `states` (from `adapter_states`, possibly snapshotted for an async save) is written instead of
    the model's live adapter tensors."""
    states = states if states is not None else adapter_states(model)
    for adapter_name in model.peft_config:
        prefix = "" if adapter_name == "default" else f"{adapter_name}/"
        state = states[adapter_name]
        with staged.create(prefix + WEIGHTS_NAME) as out:
            write_safetensors(out, _unshared(state), {"format": "pt"})
        staged.write_bytes(prefix + CONFIG_NAME, adapter_config_json(model, adapter_name))
    return base_model_info(model)


def base_model_info(model: Any) -> dict[str, Any]:
    """`{"name_or_path", "fingerprint", "algorithm", "num_tensors"}` of a PeftModel's frozen base."""
    name = getattr(model.get_base_model(), "name_or_path", None)
    active = model.peft_config.get(getattr(model, "active_adapter", "default"))
    name = name or getattr(active, "base_model_name_or_path", None)
    return {"name_or_path": name or None, **fingerprint_model(model)}


def load_adapter_into(model: Any, ckpt_dir: str, manifest: Manifest | dict[str, Any] | None = None) -> None:
    """Put a checkpoint's adapter weights (active adapter) back into `model`, after checking that
    `model` wraps the same base the checkpoint was trained on and that the files verify.

    `manifest` is the checkpoint's Manifest (read from `ckpt_dir` when None), or just its `base_model`.
    """
    plan_adapter_load(model, ckpt_dir, manifest)()


def plan_adapter_load(
    model: Any, ckpt_dir: str, manifest: Manifest | dict[str, Any] | None = None
) -> Callable[[], None]:
    """Every check of `load_adapter_into`, and the adapter read; returns the step that changes `model`."""
    if not isinstance(manifest, Manifest):
        base_info = manifest
        manifest = read_manifest(ckpt_dir)
        manifest_base_info = base_info if base_info is not None else manifest.base_model
    else:
        manifest_base_info = manifest.base_model
    recorded = (manifest_base_info or {}).get("fingerprint")
    if recorded:
        actual = fingerprint_model(model)["fingerprint"]
        if actual != recorded:
            name = (manifest_base_info or {}).get("name_or_path")
            raise IncompatibleCheckpointError(
                f"{ckpt_dir} was trained on another base model ({name}, weights fingerprint {recorded}); the "
                f"model given wraps a base with fingerprint {actual}. Load the original base and wrap it again."
            )
    from peft.utils import set_peft_model_state_dict

    adapter_name = getattr(model, "active_adapter", "default")
    prefix = "" if adapter_name == "default" else f"{adapter_name}/"
    relpath = prefix + WEIGHTS_NAME
    state = read_safetensors_verified(ckpt_dir, manifest, relpath)  # checked in the one read
    _check_keys(model, state, adapter_name, ckpt_dir)

    def load() -> None:
        try:
            result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
        except RuntimeError as exc:  # shape mismatches surface from load_state_dict
            raise IncompatibleCheckpointError(
                f"the adapter in {ckpt_dir} does not fit this model: {exc}"
            ) from exc
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise IncompatibleCheckpointError(
                f"{ckpt_dir} holds adapter tensors this model lacks:", mismatches=unexpected
            )

    return load


def _check_keys(model: Any, state: dict[str, torch.Tensor], adapter_name: str, ckpt_dir: str) -> None:
    from peft.utils import get_peft_model_state_dict

    expected = get_peft_model_state_dict(model, adapter_name=adapter_name)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    bad_shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    problems = [f"missing {k}" for k in missing] + [f"unexpected {k}" for k in extra] + bad_shapes
    if problems:
        raise IncompatibleCheckpointError(
            f"the adapter in {ckpt_dir} does not match this model's LoRA layout (rank, targets): "
            "wrap the base with the same LoraConfig",
            mismatches=problems,
        )


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # peft clones tensors sharing storage before saving; our writer copies each tensor's bytes on its
    # own, so plain detached CPU tensors are all it needs.
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def checkpoint_is_adapter(ckpt_dir: str) -> bool:
    return os.path.exists(os.path.join(ckpt_dir, CONFIG_NAME))
