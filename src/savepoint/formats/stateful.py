"""State of the user's `stateful=` objects, with the fixes some common objects need to resume exactly.

Most objects round-trip through `state_dict()` / `load_state_dict()`. torchdata's StatefulDataLoader
needs two fixes (torchdata 0.11, shuffled, single process and workers alike):

* it records its shuffling generator as it was when the epoch *started*, then replays the epoch's
  permutation on resume; draws made after that (the per-epoch base seed taken from the same
  generator) are lost, so every epoch after the resumed one is shuffled differently. We store the
  live generator states too and put them back once the resumed iterator exists.
* it applies a loaded state lazily, on the next `iter()`. We apply it during restore (its own
  `state_dict()` materialises the iterator, and the next `iter()` reuses it), so that any RNG the
  iterator consumes is consumed before savepoint restores the global RNG states, and so the
  generators above can be set after it.
"""

from __future__ import annotations

from typing import Any

import torch

_WRAPPED = "savepoint_data_loader"


def _is_stateful_data_loader(obj: Any) -> bool:
    try:
        from torchdata.stateful_dataloader import StatefulDataLoader
    except ImportError:
        return False
    return isinstance(obj, StatefulDataLoader)


def _generators(loader: Any) -> dict[str, torch.Generator]:
    found = {
        "loader": getattr(loader, "generator", None),
        "sampler": getattr(loader.sampler, "generator", None),
    }
    out: dict[str, torch.Generator] = {}
    for name, gen in found.items():
        if isinstance(gen, torch.Generator) and all(gen is not g for g in out.values()):
            out[name] = gen
    return out


def capture(obj: Any) -> Any:
    """The state tree to store for one stateful object."""
    if not _is_stateful_data_loader(obj):
        return obj.state_dict()
    state = obj.state_dict()
    live = {name: gen.get_state() for name, gen in _generators(obj).items()}
    return {_WRAPPED: 1, "state": state, "generators": live}


def check(obj: Any, state: Any, ckpt_dir: str, relpath: str) -> None:
    """What can be checked before any object changes: a data loader's document and generator states.

    Other objects' `load_state_dict` is their own code; restore runs them before it changes anything
    else, so an object that refuses its state still leaves the rest untouched.
    """
    from savepoint.errors import CorruptCheckpointError, Problem

    own_check = getattr(obj, "savepoint_check_state", None)  # savepoint's own wrappers (Accelerate's loader)
    if callable(own_check):
        own_check(state, ckpt_dir, relpath)
        return
    if not (_is_stateful_data_loader(obj) and isinstance(state, dict) and _WRAPPED in state):
        return
    generators = state.get("generators", {})
    problem = None
    if (
        state.get(_WRAPPED) != 1
        or not isinstance(state.get("state"), dict)
        or not isinstance(generators, dict)
    ):
        problem = "malformed data-loader state"
    else:
        for name, saved in generators.items():
            ok = isinstance(saved, torch.Tensor) and saved.dtype == torch.uint8 and saved.dim() == 1
            if not ok or saved.numel() != torch.Generator().get_state().numel():
                problem = f"generator state {name!r:.100} is not a CPU generator state"
    if problem:
        raise CorruptCheckpointError(ckpt_dir, [Problem(relpath, problem)])


def restore(obj: Any, state: Any) -> None:
    """Load a stored state tree into `obj`."""
    if not (_is_stateful_data_loader(obj) and isinstance(state, dict) and state.get(_WRAPPED) == 1):
        obj.load_state_dict(state)
        return
    # Accelerate's wrapper (DataLoaderShard) answers state_dict() from a cache, so the torchdata loader
    # under it is restored directly: its resumed iterator is built now, and whatever that draws from the
    # global RNG is drawn before the RNG states are put back, not at the user's next iter().
    loader = getattr(obj, "base_dataloader", obj)
    loader.load_state_dict(state["state"])
    loader.state_dict()  # materialise the resumed iterator now; the next iter() reuses it
    if loader is not obj and hasattr(obj, "dl_state_dict"):
        obj.dl_state_dict = loader.state_dict()  # a save before the next batch records the restored position
    generators = _generators(loader)
    for name, saved in state.get("generators", {}).items():
        if name in generators:
            generators[name].set_state(saved)
