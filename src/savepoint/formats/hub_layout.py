"""The Hub's on-disk layout of a transformers model, through transformers' own weight conversions.

transformers 5 holds some weights in memory in another shape than the one published on the Hub: MoE
experts fused into one tensor per layer (`mlp.experts.gate_up_proj`), vision-language models under
moved prefixes (`model.language_model.` for the Hub's `language_model.model.`). Its `save_pretrained`
converts back (`revert_weight_conversion`) and `from_pretrained` converts forward. savepoint writes and
reads the same tensors with the same machinery, one conversion group (one MoE layer's experts, say) at a
time, so a save or a restore never holds a second copy of the model.

    >>> layout = plan_hub_layout(model, savable_state_dict(model))  # doctest: +SKIP
    >>> write_weights(HubTensors(layout, state), staged)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from huggingface_hub import (
    StateDictSplit,
    get_torch_storage_id,
    get_torch_storage_size,
    split_state_dict_into_shards_factory,
)

from savepoint._json import MAX_JSON_BYTES
from savepoint.errors import IncompatibleCheckpointError
from savepoint.io.files import open_fd_inside

Group = tuple[str, ...]


@dataclass
class HubLayout:
    """How a model's in-memory tensors map to the Hub's tensors; build it with `plan_hub_layout`.

    `meta` holds the Hub's tensors (shape and dtype only) in the order transformers writes them, which
    decides the shards; `groups` are sets of in-memory names that convert together.
    """

    model: Any
    transforms: list[Any]  # transformers' WeightTransforms, in loading (forward) order
    meta: dict[str, torch.Tensor]
    groups: list[Group]
    group_of: dict[str, int] = field(default_factory=dict)  # Hub name -> index in `groups`
    # Hub name -> in-memory name, for tensors only renamed: they need no conversion, one at a time.
    renamed: dict[str, str] = field(default_factory=dict)
    # Hub name -> (storage identity, storage bytes) of the tensor transformers' conversion gives: its shard
    # splitter keeps views of one storage (one layer's experts) in one shard and counts the storage once.
    storage: dict[str, tuple[Any, int]] = field(default_factory=dict)

    def split(self, *, max_shard_size: int | str, dtype: torch.dtype | None = None) -> StateDictSplit:
        """The shards transformers' `save_pretrained` would write, with floating tensors cast to `dtype`."""
        planned: dict[str, torch.Tensor] = {}
        storage_of: dict[int, tuple[Any, int]] = {}
        for name, t in self.meta.items():
            out = dtype if dtype is not None and t.dtype.is_floating_point else t.dtype
            planned[name] = torch.empty(tuple(t.shape), dtype=out, device="meta")
            key, nbytes = self.storage[name]
            storage_of[id(planned[name])] = (key, nbytes * out.itemsize // t.dtype.itemsize)
        return split_state_dict_into_shards_factory(
            planned,
            get_storage_id=lambda t: storage_of[id(t)][0],
            get_storage_size=lambda t: storage_of[id(t)][1],
            filename_pattern="model{suffix}.safetensors",
            max_shard_size=max_shard_size,
        )

    def to_hub(self, state: Mapping[str, torch.Tensor], group: int) -> dict[str, torch.Tensor]:
        """The Hub's tensors of one group, converted from `state` (in-memory names) by transformers."""
        from transformers.core_model_loading import revert_weight_conversion

        return dict(revert_weight_conversion(self.model, {k: state[k] for k in self.groups[group]}))

    def to_memory(self, hub: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The in-memory tensors of one group, from its Hub tensors, as `from_pretrained` converts them."""
        return _convert_forward(self.model, self.transforms, hub)

    def check_round_trip(self, memory_meta: Mapping[str, torch.Tensor]) -> None:
        """Check that every group converts back to the model's own names and shapes (on meta tensors)."""
        back = self.to_memory({name: self.meta[name] for name in self.renamed})
        if {k: tuple(v.shape) for k, v in back.items()} != {
            k: tuple(memory_meta[k].shape) for k in self.renamed.values()
        }:
            raise IncompatibleCheckpointError(
                f"transformers' renaming of {type(self.model).__name__}'s weights does not rename them back; "
                "savepoint cannot restore this model from its Hub layout: load it with from_pretrained instead"
            )
        for index, group in enumerate(self.groups):
            hub = {name: self.meta[name] for name, g in self.group_of.items() if g == index}
            back = self.to_memory(hub)
            wanted = {k: tuple(memory_meta[k].shape) for k in group}
            if {k: tuple(v.shape) for k, v in back.items()} != wanted:
                raise IncompatibleCheckpointError(
                    f"transformers' weight conversion of {type(self.model).__name__} does not convert "
                    f"{sorted(hub)[:3]}... back to {sorted(group)[:3]}...; savepoint cannot restore this "
                    "model from its Hub layout: load it with from_pretrained instead"
                )


def plan_hub_layout(model: Any, state: Mapping[str, torch.Tensor]) -> HubLayout | None:
    """The Hub layout of `state` (the model's savable tensors), or None where it is the in-memory one.

    Conversion is planned on meta tensors: nothing is copied here.
    """
    transforms = _conversions(model)
    if not transforms:
        return None
    from transformers.core_model_loading import revert_weight_conversion

    memory_meta = {k: torch.empty(tuple(v.shape), dtype=v.dtype, device="meta") for k, v in state.items()}
    hub_meta = dict(revert_weight_conversion(model, dict(memory_meta)))
    if _signature(hub_meta) == _signature(memory_meta):
        return None
    layout = HubLayout(model, transforms, hub_meta, _groups(transforms, memory_meta))
    layout.storage = _storage(hub_meta, memory_meta, state)
    # A renaming hands the tensor itself through, so identity tells which Hub tensors are only renamed.
    source = {id(t): name for name, t in memory_meta.items()}
    layout.renamed = {name: source[id(t)] for name, t in hub_meta.items() if id(t) in source}
    converted = {name: hub_meta[name] for name in layout.renamed}
    produced = len(converted)
    renamed_sources = set(layout.renamed.values())
    layout.groups = [g for g in layout.groups if not renamed_sources.issuperset(g)]
    for index in range(len(layout.groups)):
        part = layout.to_hub(memory_meta, index)
        layout.group_of.update(dict.fromkeys(part, index))
        converted.update(part)
        produced += len(part)
    if _signature(converted) != _signature(hub_meta) or produced != len(hub_meta):
        # Our grouping missed a many-to-one conversion: convert everything at once, as transformers does.
        layout.groups = [tuple(memory_meta)]
        layout.group_of = dict.fromkeys(hub_meta, 0)
        layout.renamed = {}
    return layout


def hub_names(model: Any, state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """In-memory name -> Hub name of the tensors of `state` that transformers' conversions only rename
    (a vision-language model's prefixes); empty when the model has no renaming. Planned on meta tensors."""
    meta = {k: torch.empty(tuple(v.shape), dtype=v.dtype, device="meta") for k, v in state.items()}
    layout = plan_hub_layout(model, meta)
    return {} if layout is None else {memory: hub for hub, memory in layout.renamed.items()}


class HubTensors(Mapping[str, torch.Tensor]):
    """The model's tensors under their Hub names, converted group by group when first asked for.

    A converted tensor is handed out once and then forgotten, so a writer that takes the tensors in
    order holds one group's conversion at a time; asking again converts its group again.
    """

    def __init__(self, layout: HubLayout, state: Mapping[str, torch.Tensor]) -> None:
        self.layout = layout
        self.state = state
        self._converted: dict[str, torch.Tensor] = {}
        self._served: set[str] = set()

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.layout.renamed:
            return self.state[self.layout.renamed[name]]
        if name not in self._converted:
            group = self.layout.group_of[name]  # KeyError for a name the layout does not have
            # Keep only what is still to be handed out, so asking twice leaks nothing.
            part = self.layout.to_hub(self.state, group)
            self._converted.update({k: v for k, v in part.items() if k == name or k not in self._served})
        self._served.add(name)
        return self._converted.pop(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.layout.meta)

    def __len__(self) -> int:
        return len(self.layout.meta)


class HubLoader:
    """Gathers Hub tensors read from a checkpoint into groups; a complete group comes out converted."""

    def __init__(self, layout: HubLayout) -> None:
        self.layout = layout
        self._pending: dict[int, dict[str, torch.Tensor]] = {}
        self._sizes: dict[int, int] = {}
        for group in layout.group_of.values():
            self._sizes[group] = self._sizes.get(group, 0) + 1

    def put(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """Add one Hub tensor; return its group's in-memory tensors once the group is complete."""
        if name in self.layout.renamed:
            return {self.layout.renamed[name]: tensor}
        group = self.layout.group_of[name]
        pending = self._pending.setdefault(group, {})
        pending[name] = tensor
        if len(pending) < self._sizes[group]:
            return None
        del self._pending[group]
        return self.layout.to_memory(pending)

    def finish(self) -> None:
        if self._pending:
            missing = sorted(n for g in self._pending for n, h in self.layout.group_of.items() if h == g)
            raise IncompatibleCheckpointError(f"the checkpoint's weight files lack {missing[:5]}")


def layout_for_config(
    model_dir: str, state: Mapping[str, torch.Tensor]
) -> tuple[HubLayout | None, int | None]:
    """The Hub layout of `state` (in-memory names) for the model `model_dir/config.json` describes, and
    its parameter count; (None, None) when no transformers class is known for it. The model is built on
    the meta device (no weights), from transformers' own classes only: nothing from the directory runs."""
    model = meta_model_for_config(model_dir)
    if model is None:
        return None, None
    return plan_hub_layout(model, state), model.num_parameters()


def meta_model_for_config(model_dir: str) -> Any | None:
    """The transformers model `model_dir/config.json` describes, built on the meta device (no weights,
    transformers' own classes only); None when no transformers class is known for it."""
    import transformers

    # transformers opens config.json by its path: first make sure that path is a regular file inside
    # `model_dir`, reached through no link, and small (the directory may be someone else's).
    try:
        fd, _ = open_fd_inside(model_dir, "config.json", max_bytes=MAX_JSON_BYTES)
    except FileNotFoundError:
        return None
    os.close(fd)
    try:
        config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
        model_cls = getattr(transformers, (getattr(config, "architectures", None) or [""])[0], None)
        if model_cls is None:
            return None
        with torch.device("meta"):
            return model_cls(config)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def _conversions(model: Any) -> list[Any]:
    """The transforms `revert_weight_conversion` undoes when transformers saves `model` (same rule)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange

    transforms = getattr(model, "_weight_conversions", None)
    if transforms is None:
        # As transformers does for a model not made by from_pretrained: no legacy renames, no prefix changes.
        transforms = get_model_conversion_mapping(model, add_legacy=False)
        transforms = [t for t in transforms if not isinstance(t, PrefixChange)]
    return list(transforms)


def _groups(transforms: list[Any], memory_meta: Mapping[str, torch.Tensor]) -> list[Group]:
    """In-memory names that must convert together: those one converter turns into the same target.

    Names no converter matches share one group; `plan_hub_layout` then takes those only renamed out of
    the groups altogether (see `HubLayout.renamed`).
    """
    from transformers.core_model_loading import WeightConverter, apply_converters

    converters: list[Any] = [
        t.reverse_transform() for t in transforms[::-1] if isinstance(t, WeightConverter)
    ]
    groups: dict[str, list[str]] = {}
    for name in memory_meta:
        target, pattern = apply_converters(name, converters)
        groups.setdefault(target if pattern is not None else "", []).append(name)
    return [tuple(names) for names in groups.values()]


def _convert_forward(
    model: Any, transforms: list[Any], hub: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """From Hub names to in-memory ones, in the steps of `from_pretrained`'s loading loop."""
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        dot_natural_key,
        rename_source_key,
    )

    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    pending: dict[str, Any] = {}
    for name in sorted(hub, key=dot_natural_key):
        target, pattern = rename_source_key(name, renamings, converters)
        if pattern is not None:
            step = pending.setdefault(target, copy.deepcopy(by_pattern[pattern]))
        else:
            step = pending.setdefault(target, WeightRenaming(name, target))
            pattern = name
        step.add_tensor(target, name, pattern, hub[name])
    out: dict[str, torch.Tensor] = {}
    for first, step in pending.items():
        for target, value in step.convert(first, model=model, config=model.config).items():
            out[target] = value[0] if isinstance(value, list) else value
    return out


def _storage(
    hub_meta: Mapping[str, torch.Tensor],
    memory_meta: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
) -> dict[str, tuple[Any, int]]:
    """Which Hub tensors share a storage once converted, found through the meta tensors' view bases."""
    source = {id(t): name for name, t in memory_meta.items()}
    out: dict[str, tuple[Any, int]] = {}
    for name, t in hub_meta.items():
        root = t._base if t._base is not None else t
        if id(root) in source and state[source[id(root)]].device.type == "meta":  # planned from shapes only
            out[name] = (("memory", source[id(root)]), root.untyped_storage().nbytes())
        elif id(root) in source:  # the model's own tensor, or a view of it
            real = state[source[id(root)]]
            out[name] = (get_torch_storage_id(real), get_torch_storage_size(real))
        else:  # a fresh tensor the conversion made
            out[name] = (("converted", id(root)), root.untyped_storage().nbytes())
    return out


def _signature(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}
