"""A content fingerprint of a base model's weights, the same whether it is read from a directory of
safetensors files or from the modules of a model in memory (peft-wrapped or not).

Why it is built this way:
- Tensor *names* are left out and the per-tensor digests are combined as a sorted multiset, because a
  tied weight has two names in memory (`lm_head.weight`, `transformer.wte.weight`) but only one in the
  files; tensors sharing storage in memory are counted once, as the files store them once.
- An in-memory model is hashed in the files' layout (transformers' own conversion: MoE experts one
  tensor per expert), since the fused tensors of memory are not the tensors a base directory holds.
- Floating tensors are hashed after a cast to bfloat16, so a base saved in float32 and the same base
  loaded in bfloat16 for training have one fingerprint; a different base still differs almost everywhere.

The fingerprint of a directory of weights is `savepoint.lora.base.fingerprint_dir` (it reads through
`BaseWeights`, which builds on this module).

    >>> fingerprint_model(model)["fingerprint"]  # doctest: +SKIP
    '8c4f...'
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch

from savepoint._hashing import new_hasher
from savepoint.formats.safetensors_io import tensor_bytes

ALGORITHM = "xxh3_128/bf16/multiset-v1"
# peft renames or adds these in a wrapped model; the base weights live under the names without them.
_RENAMES = (".base_layer.", ".original_module.")
_ADAPTER_MARKERS = ("lora_", ".modules_to_save.", ".token_adapter.")

_model_cache: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, Any]] = weakref.WeakKeyDictionary()


def tensor_digest(t: torch.Tensor) -> str:
    """The digest of one tensor's values and shape (floats canonicalized to bfloat16)."""
    t = t.detach()
    if t.is_floating_point():
        t = t.to(torch.bfloat16)
    hasher = new_hasher()
    hasher.update(f"{t.dtype}{tuple(t.shape)}".encode())
    hasher.update(tensor_bytes(t))
    return hasher.hexdigest()


class Fingerprinter:
    """Accumulates tensor digests in any order; `result()` is order-independent."""

    def __init__(self) -> None:
        self._digests: list[str] = []

    def add(self, t: torch.Tensor) -> None:
        self._digests.append(tensor_digest(t))

    def result(self) -> dict[str, Any]:
        hasher = new_hasher()
        for d in sorted(self._digests):
            hasher.update(d.encode())
        return {"fingerprint": hasher.hexdigest(), "algorithm": ALGORITHM, "num_tensors": len(self._digests)}


def unwrap_peft(module: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PeftModel (the module itself when it is not wrapped)."""
    get_base = getattr(module, "get_base_model", None)
    inner = get_base() if callable(get_base) else module
    return inner if isinstance(inner, torch.nn.Module) else module


def base_state_items(module: torch.nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    """The base model's (name, tensor) pairs of a possibly peft-wrapped module, adapter tensors left out."""
    inner = unwrap_peft(module)
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    for name, t in inner.state_dict().items():
        if any(m in name for m in _ADAPTER_MARKERS):
            continue
        ptr = t.untyped_storage().data_ptr() if t.device.type != "meta" and t.numel() else id(t)
        key = (ptr, t.storage_offset(), tuple(t.shape))
        if key in seen:  # tied: stored once in the files, so counted once here
            continue
        seen.add(key)
        for marker in _RENAMES:
            while marker in name:  # peft nests one wrapper per targeted parameter (target_parameters)
                name = name.replace(marker, ".")
        yield name, t


def fingerprint_model(module: torch.nn.Module) -> dict[str, Any]:
    """Fingerprint of the frozen base weights of an in-memory model (cached per model object,
    because the base does not change during a LoRA run and hashing it costs a pass over memory)."""
    cached = _model_cache.get(module)
    if cached is None:
        from savepoint.formats.hf import hub_state

        fp = Fingerprinter()
        for t in hub_state(unwrap_peft(module), dict(base_state_items(module))).values():
            fp.add(t.cpu())
        cached = _model_cache[module] = fp.result()
    return dict(cached)
