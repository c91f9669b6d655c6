"""LoRA on fused MoE expert parameters (peft's `target_parameters`), merged into a base in the Hub layout.

transformers 5 holds a layer's experts fused (`mlp.experts.gate_up_proj`, (experts, 2 * inter, hidden))
while the Hub stores one tensor per expert (`block_sparse_moe.experts.0.w1.weight`). peft trains LoRA on
the fused parameter, so the merge reads one layer's per-expert base tensors, fuses them with
transformers' forward conversion, adds the delta there, and splits the result back with transformers'
reverse conversion: memory stays at one conversion group (one layer's experts) plus the adapter.

peft wraps every targeted parameter of a module in its own `ParamWrapper`, nested in the module's
parameter order: the adapter keys of the first targeted parameter carry the most `.base_layer` parts.

    >>> edits = take_expert_edits(plan, meta_model)  # doctest: +SKIP
    >>> stream = ExpertStream(meta_model, edits, weights.infos)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from savepoint.errors import IncompatibleCheckpointError, MergeError
from savepoint.formats.hub_layout import plan_hub_layout
from savepoint.lora import math as lora_math
from savepoint.lora.adapter import LoraEdit, MergePlan
from savepoint.lora.base import BaseWeights, TensorInfo
from savepoint.lora.math import lora_scaling
from savepoint.lora.patterns import pattern_value

_WRAPPED = ".base_layer"


@dataclass
class ExpertEdit:
    """The LoRA of one fused expert parameter (`param` is its in-memory name)."""

    param: str
    a: torch.Tensor  # (experts * r, in)
    b: torch.Tensor  # (out, r * experts)
    scaling: float
    transposed: bool  # the parameter is (experts, in, out): transformers' `is_transposed` experts

    def merge(self, weight: torch.Tensor) -> torch.Tensor:
        return lora_math.merge_experts(
            weight, self.a, self.b, scaling=self.scaling, transposed=self.transposed
        )


def take_expert_edits(plan: MergePlan, model: Any) -> dict[str, ExpertEdit]:
    """Move the plan's edits of `target_parameters` out of `plan.weights`, keyed by in-memory parameter.

    `model` is the base's transformers model on the meta device (its module tree says which parameters
    peft wrapped). MergeError for what savepoint cannot merge exactly as peft does."""
    targets = [str(t) for t in plan.config.get("target_parameters") or []]
    if not targets:
        return {}
    if plan.config.get("use_dora") or plan.config.get("lora_bias"):
        raise MergeError(
            "this adapter sets target_parameters with use_dora or lora_bias, which peft itself does not "
            "support on raw parameters; savepoint cannot merge it"
        )
    if model is None:
        raise MergeError(
            "this adapter trains LoRA on raw parameters (target_parameters); merging it needs the base's "
            "config.json to name a transformers architecture, and this base's does not"
        )
    found: dict[str, dict[int, LoraEdit]] = {}
    for key, edit in list(plan.weights.items()):
        module, depth = _unwrap(edit.module)
        if not _targeted(model, module, targets):
            continue  # a plain target_modules layer
        found.setdefault(module, {})[depth] = edit
        del plan.weights[key]
    edits: dict[str, ExpertEdit] = {}
    for module, by_depth in found.items():
        params = _targeted(model, module, targets)
        if sorted(by_depth) != list(range(len(params))):
            raise IncompatibleCheckpointError(
                f"the adapter has {len(by_depth)} LoRA(s) on {module} but its target_parameters match "
                f"{len(params)} parameter(s) of the base's module ({params}); pass the base it was trained on"
            )
        for depth, edit in by_depth.items():
            name = params[len(params) - 1 - depth]  # the innermost wrapper holds the first parameter
            edits[name] = _expert_edit(model, module, name, edit, plan.config)
    return edits


class ExpertStream:
    """Merged Hub tensors for the Hub names a fused expert edit touches, one conversion group at a time."""

    def __init__(self, model: Any, edits: Mapping[str, ExpertEdit], infos: Mapping[str, TensorInfo]):
        self.edits = dict(edits)
        layout = plan_hub_layout(model, model.state_dict())
        self._layout = layout
        self._direct: dict[str, ExpertEdit] = {}  # Hub name -> edit, where the Hub stores it fused
        self._group_of: dict[str, int] = {}  # Hub name -> conversion group
        expected: dict[str, tuple[int, ...]] = {}
        for name, edit in self.edits.items():
            renamed = [h for h, m in layout.renamed.items() if m == name] if layout is not None else [name]
            if layout is None or renamed:
                self._direct[renamed[0]] = edit
                expected[renamed[0]] = tuple(model.get_parameter(name).shape)
                continue
            index = next((i for i, g in enumerate(layout.groups) if name in g), None)
            if index is None:
                raise MergeError(
                    f"transformers' weight conversion of {type(model).__name__} does not cover {name}"
                )
            for hub_name, group in layout.group_of.items():
                if group == index:
                    self._group_of[hub_name] = index
                    expected[hub_name] = tuple(layout.meta[hub_name].shape)
        wrong = [
            f"{n}: base has {infos[n].shape if n in infos else 'no such tensor'}, the model's layout {shape}"
            for n, shape in expected.items()
            if n not in infos or infos[n].shape != shape
        ]
        if wrong:
            raise IncompatibleCheckpointError(
                "the base's expert tensors do not fit the adapter's model (wrong base?):", mismatches=wrong
            )
        self._pending: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def covers(self, key: str) -> bool:
        return key in self._direct or key in self._group_of

    def take(self, key: str, weights: BaseWeights) -> tuple[torch.Tensor, torch.Tensor]:
        """(base tensor, merged float32 tensor) of one Hub name; its group is read and merged when first
        asked for, and forgotten tensor by tensor as they are taken."""
        if key in self._direct:
            base = weights.get(key)
            return base, self._direct[key].merge(base)
        if key not in self._pending:
            self._pending.update(self._merge_group(self._group_of[key], weights))
        return self._pending.pop(key)

    def _merge_group(self, index: int, weights: BaseWeights) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        assert self._layout is not None
        names = [n for n, g in self._group_of.items() if g == index]
        bases = {n: weights.get(n) for n in names}
        fused = self._layout.to_memory(dict(bases))
        for param, tensor in fused.items():
            if param in self.edits:
                fused[param] = self.edits[param].merge(tensor)
        merged = self._layout.to_hub(fused, index)
        return {n: (bases[n], merged[n]) for n in names}


def meta_twin(model: torch.nn.Module) -> Any | None:
    """A weightless copy (meta device) of a transformers model, without any peft layers in its tree."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    try:
        with torch.device("meta"):
            return type(model)(copy.deepcopy(config))
    except (TypeError, ValueError, AttributeError):
        return None


def _unwrap(module: str) -> tuple[str, int]:
    """('model.layers.0.mlp.experts', 1) from 'model.layers.0.mlp.experts.base_layer'."""
    depth = 0
    while module.endswith(_WRAPPED):
        module, depth = module[: -len(_WRAPPED)], depth + 1
    return module, depth


def _targeted(model: Any, module: str, targets: list[str]) -> list[str]:
    """The parameters of `module` that peft's target_parameters rule matches, in the module's order."""
    try:
        sub = model.get_submodule(module)
    except AttributeError:
        return []
    names = [f"{module}.{n}" for n, _ in sub.named_parameters(recurse=False)]
    return [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]


def _expert_edit(model: Any, module: str, name: str, edit: LoraEdit, config: Mapping[str, Any]) -> ExpertEdit:
    shape = tuple(model.get_parameter(name).shape)
    if len(shape) != 3:
        raise MergeError(
            f"the adapter trains LoRA on the {len(shape)}-D parameter {name} (target_parameters); savepoint "
            "merges target_parameters on fused 3-D MoE expert parameters only"
        )
    assert edit.a is not None and edit.b is not None  # build_plan guarantees both
    experts = shape[0]
    transposed = bool(getattr(model.get_submodule(module), "is_transposed", False))
    rank_rows = int(edit.a.shape[0])
    want = (
        (int(edit.a.shape[1]), int(edit.b.shape[0]))
        if transposed
        else (int(edit.b.shape[0]), int(edit.a.shape[1]))
    )
    if rank_rows % experts or int(edit.b.shape[1]) != rank_rows or shape[1:] != want:
        raise IncompatibleCheckpointError(
            f"{name}: base parameter {shape}, but the adapter's lora_A {tuple(edit.a.shape)} and lora_B "
            f"{tuple(edit.b.shape)} do not fit {experts} experts; pass the base it was trained on"
        )
    alpha = pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8))
    scaling = lora_scaling(float(alpha), rank_rows // experts, rslora=bool(config.get("use_rslora")))
    return ExpertEdit(name, edit.a, edit.b, scaling, transposed)
