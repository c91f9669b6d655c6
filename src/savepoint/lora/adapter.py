"""PEFT LoRA adapters as files: read and check `adapter_config.json` + `adapter_model.safetensors`,
and turn them into a merge plan keyed by the *base model's* tensor names.

peft writes adapter tensors under `base_model.model.<module>.<part>`, where `<module>` is the module's
name in the transformers model (so `<module>.weight` is its key in the base checkpoint) and `<part>` is
one of `lora_A.weight`, `lora_B.weight`, `lora_B.bias`, `lora_magnitude_vector` (DoRA),
`lora_embedding_A`, `lora_embedding_B`, `base_layer.weight` (a saved copy of a targeted embedding), or
a plain parameter name for `modules_to_save` copies, which replace the base tensor of the same key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from savepoint._json import read_json_inside
from savepoint.errors import MergeError
from savepoint.formats.safetensors_io import read_header, read_safetensors
from savepoint.lora.math import lora_scaling
from savepoint.lora.patterns import pattern_value
from savepoint.manifest import read_manifest, resolve_inside, verify_files
from savepoint.storage.local import MANIFEST_NAME

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

# Config fields whose non-empty value means a LoRA flavour that has no static merged weight (routing,
# sampling, replicated layers) or that rewrites base parameters we do not stream. Refused by name.
_UNMERGEABLE = {
    "arrow_config": "Arrow routes tokens between adapters at run time",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens",
    "monteclora_config": "MonteCLoRA samples its adapter",
    "velora_config": "VeLoRA is not a weight delta savepoint can merge",
    "kasa_config": "KaSA is not a weight delta savepoint can merge",
    "mica": "MiCA is not a weight delta savepoint can merge",
    "use_bdlora": "block-diagonal LoRA is not supported by savepoint's merge",
    "use_qalora": "QA-LoRA targets quantized bases",
    "layer_replication": "layer replication changes the model's architecture",
    "trainable_token_indices": "trainable tokens are not supported by savepoint's merge",
    "megatron_config": "Megatron parallel layers are not supported",
}
_PARTS = (
    "lora_A.weight",
    "lora_B.weight",
    "lora_B.bias",
    "lora_magnitude_vector",
    "lora_embedding_A",
    "lora_embedding_B",
    "base_layer.weight",
)


@dataclass
class LoraEdit:
    """Everything needed to merge one targeted module (names are module paths in the base model)."""

    module: str
    scaling: float
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None
    embedding: bool = False
    base_override: torch.Tensor | None = None  # peft saved the targeted embedding's own weight
    transposed: bool = False  # the base stores this weight as (in, out): GPT-2's Conv1D


@dataclass
class MergePlan:
    """What a merge does to the base, keyed by base tensor name."""

    config: dict[str, Any]
    weights: dict[str, LoraEdit] = field(default_factory=dict)  # "<module>.weight" -> edit
    biases: dict[str, LoraEdit] = field(default_factory=dict)  # "<module>.bias" -> edit (lora_bias)
    replace: dict[str, torch.Tensor] = field(default_factory=dict)  # modules_to_save copies

    @property
    def touched(self) -> set[str]:
        return set(self.weights) | set(self.biases) | set(self.replace)

    def rename(self, names: Mapping[str, str]) -> None:
        """Key the plan by other tensor names (`names`: old -> new); names not in `names` stay."""
        for edits in (self.weights, self.biases):
            renamed = {names.get(k, k): e for k, e in edits.items()}
            edits.clear()
            edits.update(renamed)
        self.replace = {names.get(k, k): t for k, t in self.replace.items()}
        # A module's weight and bias share one edit: rename its module once.
        unique = {id(e): e for e in [*self.weights.values(), *self.biases.values()]}
        for edit in unique.values():
            weight = names.get(f"{edit.module}.weight")
            if weight is not None:
                edit.module = weight.removesuffix(".weight")


def read_adapter_config(adapter_dir: str) -> dict[str, Any]:
    """Read `adapter_config.json`; MergeError if it is missing or not a LoRA config."""
    path = os.path.join(adapter_dir, CONFIG_NAME)
    if not os.path.exists(path):
        raise MergeError(f"{adapter_dir} has no {CONFIG_NAME}: it is not a PEFT adapter directory")
    config = read_json_inside(adapter_dir, CONFIG_NAME, lambda reason: MergeError(f"{path}: {reason}"))
    if not isinstance(config, dict):
        raise MergeError(f"{path} is not a JSON object")
    return config


def unsupported_reasons(config: Mapping[str, Any]) -> list[str]:
    """Why this adapter cannot be merged (empty when it can)."""
    reasons = []
    if config.get("peft_type") != "LORA":
        reasons.append(f"peft_type is {config.get('peft_type')!r}; savepoint merges LoRA adapters only")
    for key, why in _UNMERGEABLE.items():
        if config.get(key):
            reasons.append(f"{key} is set: {why}")
    return reasons


def load_adapter_tensors(adapter_dir: str) -> dict[str, torch.Tensor]:
    """All adapter tensors (small: a few percent of the base). Checked against savepoint.json if present."""
    if os.path.exists(os.path.join(adapter_dir, MANIFEST_NAME)):
        verify_files(adapter_dir, read_manifest(adapter_dir), [CONFIG_NAME, WEIGHTS_NAME])
    if not os.path.exists(os.path.join(adapter_dir, WEIGHTS_NAME)):
        if os.path.exists(os.path.join(adapter_dir, "adapter_model.bin")):
            raise MergeError(
                f"{adapter_dir} holds a pickled adapter_model.bin; savepoint reads only safetensors. "
                "Re-save it with peft's save_pretrained(safe_serialization=True)."
            )
        raise MergeError(f"{adapter_dir} has no {WEIGHTS_NAME}")
    path = resolve_inside(adapter_dir, WEIGHTS_NAME)
    return read_safetensors(path, checkpoint=adapter_dir, relpath=WEIGHTS_NAME)


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    # peft's rule (a regex on the end of the module name, first match wins), in linear time.
    return pattern_value(patterns, module, default)


def split_key(key: str) -> tuple[str, str]:
    """('model.layers.0.q_proj', 'lora_A.weight') from a peft adapter key; part '' for plain tensors."""
    name = key.removeprefix(PREFIX)
    for part in _PARTS:
        if name.endswith("." + part):
            return name[: -len(part) - 1], part
    return name, ""


def build_plan(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> MergePlan:
    """Group adapter tensors by target module; MergeError on anything savepoint cannot merge."""
    reasons = unsupported_reasons(config)
    if reasons:
        raise MergeError("this adapter cannot be merged:\n  - " + "\n  - ".join(reasons))
    plan = MergePlan(config=dict(config))
    edits: dict[str, LoraEdit] = {}
    for key, tensor in tensors.items():
        module, part = split_key(key)
        if not part:
            if "lora_" in key:
                raise MergeError(f"adapter tensor {key!r} is of a LoRA layer type savepoint cannot merge")
            plan.replace[module] = tensor  # modules_to_save: `module` is already the full base key
            continue
        edit = edits.setdefault(module, LoraEdit(module=module, scaling=0.0))
        _assign(edit, part, tensor)
    for module, edit in edits.items():
        _finish(edit, config)
        plan.weights[f"{module}.weight"] = edit
        if edit.bias is not None:
            plan.biases[f"{module}.bias"] = edit
    return plan


def _assign(edit: LoraEdit, part: str, tensor: torch.Tensor) -> None:
    if part in ("lora_A.weight", "lora_embedding_A"):
        edit.a = tensor
    elif part in ("lora_B.weight", "lora_embedding_B"):
        edit.b = tensor
    elif part == "lora_B.bias":
        edit.bias = tensor
    elif part == "lora_magnitude_vector":
        edit.magnitude = tensor
    else:
        edit.base_override = tensor
    edit.embedding = edit.embedding or part.startswith("lora_embedding")


def _finish(edit: LoraEdit, config: Mapping[str, Any]) -> None:
    if edit.a is None or edit.b is None:
        raise MergeError(
            f"adapter module {edit.module!r} lacks its lora_A or lora_B tensor; the adapter is incomplete"
        )
    if edit.a.ndim != 2 or edit.b.ndim != 2:
        raise MergeError(
            f"adapter module {edit.module!r} has {edit.a.ndim}-D LoRA weights (a convolution?); "
            "savepoint merges Linear, Conv1D and Embedding layers only"
        )
    r = int(edit.a.shape[0])  # the saved shape is the truth; rank_pattern only explains it
    alpha = _pattern_value(config.get("alpha_pattern") or {}, edit.module, config.get("lora_alpha", 8))
    edit.scaling = lora_scaling(float(alpha), r, rslora=bool(config.get("use_rslora")))


def describe_adapter(adapter_dir: str) -> dict[str, Any]:
    """A summary of a PEFT LoRA adapter directory, for `savepoint inspect`.

    >>> describe_adapter("runs/sft/step-00001200")  # doctest: +SKIP
    {'peft_type': 'LORA', 'r': 16, 'lora_alpha': 32, 'scaling': 2.0, 'target_modules': [...], ...}
    """
    config = read_adapter_config(adapter_dir)
    r, alpha = config.get("r"), config.get("lora_alpha")
    info: dict[str, Any] = {
        "peft_type": config.get("peft_type"),
        "base_model_name_or_path": config.get("base_model_name_or_path"),
        "r": r,
        "lora_alpha": alpha,
        "scaling": lora_scaling(alpha, r, rslora=bool(config.get("use_rslora"))) if r and alpha else None,
        "target_modules": config.get("target_modules"),
        "modules_to_save": config.get("modules_to_save"),
        "rank_pattern": config.get("rank_pattern") or {},
        "alpha_pattern": config.get("alpha_pattern") or {},
    }
    for flag in ("use_rslora", "use_dora", "lora_bias", "fan_in_fan_out"):
        info[flag] = bool(config.get(flag))
    weights = os.path.join(adapter_dir, WEIGHTS_NAME)
    if os.path.exists(weights):
        shapes = [
            shape for _, shape in read_header(weights, checkpoint=adapter_dir, relpath=WEIGHTS_NAME).values()
        ]
        info["num_tensors"] = len(shapes)
        info["num_parameters"] = sum(int(torch.Size(s).numel()) for s in shapes)
        info["size_bytes"] = os.path.getsize(weights)
    info["unsupported"] = unsupported_reasons(config)
    info["mergeable"] = not info["unsupported"]
    return info
