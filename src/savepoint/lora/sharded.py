"""LoRA adapters of sharded (FSDP2, `fully_shard`) models: gathered whole, fingerprinted like a plain base.

Every rank holds only a shard of each adapter tensor (a DTensor), and of each base tensor. A checkpoint
must not depend on how the run was sharded, so:

- the adapter is gathered tensor by tensor (`DTensor.full_tensor()`, every rank in the same order)
  and rank 0 writes it in PEFT's layout, exactly what a single process would write;
- the base fingerprint is computed over the *full* base tensors, gathered one at a time (peak memory:
  one tensor), so it equals `fingerprint_model` of the same base in a plain process, whatever the
  world size. It is cached on the model like the plain fingerprint, so the gather runs once per run.

Both are collective: every rank calls them, in the same order.

    states = gather_adapter_states(peft_model)  # doctest: +SKIP  (full tensors on rank 0, {} elsewhere)
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from savepoint import distributed
from savepoint.lora import fingerprint


def uses_dtensor(model: torch.nn.Module) -> bool:
    """True for FSDP2 (`fully_shard`) models, whose parameters are DTensors; False for FSDP1."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t  # collective for DTensors


def gather_adapter_states(model: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """adapter name -> its full tensors as peft saves them, on rank 0's CPU (empty dicts elsewhere)."""
    from savepoint.formats.peft import adapter_states

    out: dict[str, dict[str, torch.Tensor]] = {}
    for adapter_name, state in adapter_states(model).items():
        gathered = {}
        for key, tensor in state.items():  # dict order is the module order: the same on every rank
            full = _full(tensor.detach())
            if distributed.rank() == 0:
                gathered[key] = full.cpu().clone()
            del full
        out[adapter_name] = gathered
    return out


def _base_tensors(model: torch.nn.Module) -> Iterator[torch.Tensor]:
    """The base's tensors, tied ones once, in state-dict order (the same on every rank).

    Ties are found by parameter identity (`alias_names`), not by storage as `base_state_items` does for
    plain tensors: a rank's local shard may be empty, and then storage says nothing."""
    inner = fingerprint.unwrap_peft(model)
    aliases = distributed.alias_names(inner)
    for name, tensor in inner.state_dict().items():
        if name in aliases or any(m in name for m in fingerprint._ADAPTER_MARKERS):
            continue
        yield tensor


def prime_fingerprint(model: torch.nn.Module) -> dict[str, object]:
    """Fingerprint the full base of a sharded PeftModel (collective) and cache it on `model`, so that
    `fingerprint_model(model)` (used when writing and checking the manifest) returns it on every rank."""
    cached = fingerprint._model_cache.get(model)
    if cached is not None:
        return dict(cached)
    fp = fingerprint.Fingerprinter()
    for tensor in _base_tensors(model):
        full = _full(tensor.detach())  # every rank holds the full tensor and hashes it: no broadcast needed
        fp.add(full.cpu())
        del full
    result = fingerprint._model_cache[model] = fp.result()
    return dict(result)
