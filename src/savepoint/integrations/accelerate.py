"""`AcceleratorCheckpointer`: save and restore what an `Accelerator` prepared, through savepoint.

    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(
        use_stateful_dataloader=True, use_seedable_sampler=True))
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    ckpt = AcceleratorCheckpointer("runs/exp1", save_every=100, keep_last=3)
    state = dict(model=model, optimizer=opt, scheduler=sched, dataloader=loader)
    step = ckpt.restore(**state).step                   # 0 on a fresh run
    for epoch in range(loader.iteration, num_epochs):   # a resumed loader knows its epoch
        for batch in loader:                            # ... and its position in it
            ...
            step += 1
            ckpt.maybe_save(step, **state)

Works in one process and under `accelerate launch` (every process calls `save` and `restore`:
savepoint's collective save writes the replicated model and optimizer once, and each process's RNG
states and data-loader position as its own part). The prepared model, optimizer and scheduler go
to `CheckpointManager` as they are (savepoint unwraps DDP); what this module adds is the data
loader: accelerate keeps the epoch outside the loader's `state_dict()`, and a resumed run needs it.

The data loader must be prepared with `use_stateful_dataloader=True` (torchdata: a plain
`DataLoader` has no position to save) and, when it shuffles, `use_seedable_sampler=True` (each
epoch's order is then a function of the seed and the epoch, which the checkpoint records). A plain
`DataLoader(shuffle=True)` without `generator=` is fine: restoring builds the resumed iterator (which
draws a seed from the global RNG) before the RNG states are put back, as in the uninterrupted run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from savepoint import policy
from savepoint.errors import CorruptCheckpointError, Problem, SavepointError
from savepoint.formats import stateful as stateful_format
from savepoint.manager import CheckpointManager
from savepoint.restoring import RestoreResult

LOADER_KEY = "dataloader"
_FIX = (
    "prepare it with Accelerator(dataloader_config=DataLoaderConfiguration("
    "use_stateful_dataloader=True, use_seedable_sampler=True))"
)


class LoaderPosition:
    """A prepared data loader as a `stateful=` object: its position in the epoch, and the epoch."""

    def __init__(self, loader: Any) -> None:
        _check_loader(loader)
        self.loader = loader

    def state_dict(self) -> dict[str, Any]:
        return {"position": stateful_format.capture(self.loader), "epoch": epoch_to_resume(self.loader)}

    def savepoint_check_state(self, state: Any, ckpt_dir: str, relpath: str) -> None:
        """Refuse a saved position this loader could not take, before restore changes anything."""
        epoch = state.get("epoch") if isinstance(state, dict) else None
        if type(epoch) is not int or not 0 <= epoch < 2**31 or "position" not in state:
            raise CorruptCheckpointError(
                ckpt_dir,
                [Problem(relpath, f"not a data-loader position (epoch {epoch!r:.40}, needs 'position')")],
            )
        stateful_format.check(self.loader, state["position"], ckpt_dir, relpath)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(state["epoch"])  # the seedable sampler's order is a function of the epoch
        # formats.stateful restores the torchdata loader under Accelerate's wrapper (see there why).
        stateful_format.restore(self.loader, state["position"])


def epoch_to_resume(loader: Any) -> int:
    """The epoch a resumed run continues: `loader.iteration`, plus one after the epoch's last batch.

    Accelerate counts an epoch as done only when its iterator is exhausted, which happens after the
    loop body of the last batch has run; a checkpoint taken there records a finished iterator, and
    must resume with the next epoch, not replay this one.
    """
    epoch = int(getattr(loader, "iteration", 0))
    finished = bool(loader.state_dict().get("_iterator_finished", False))
    references = getattr(getattr(loader, "gradient_state", None), "dataloader_references", None) or []
    iterating = any(ref is loader for ref in references)  # between the epoch's first batch and its end
    return epoch + 1 if finished and iterating else epoch


class AcceleratorCheckpointer:
    """Checkpoints of one Accelerate run; `manager_options` go to `CheckpointManager` (root: path or URL)."""

    def __init__(self, root: str | os.PathLike[str], **manager_options: Any) -> None:
        self.manager = CheckpointManager(root, **manager_options)

    def maybe_save(self, step: int, **kwargs: Any) -> str | None:
        """`save` when the manager's `save_every` schedule says so (call it on every process alike)."""
        return self.save(step, **kwargs) if policy.should_save(step, self.manager.save_every) else None

    def save(
        self, step: int, *, dataloader: Any = None, stateful: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> str:
        """`CheckpointManager.save` with the data loader's position; call it on every process."""
        return self.manager.save(step, stateful=_with_loader(stateful, dataloader), **kwargs)

    def restore(
        self, *, dataloader: Any = None, stateful: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> RestoreResult:
        """`CheckpointManager.restore`, data loader included; call it on every process. Step 0 when empty."""
        return self.manager.restore(stateful=_with_loader(stateful, dataloader), **kwargs)


def _with_loader(stateful: Mapping[str, Any] | None, loader: Any) -> dict[str, Any]:
    out = dict(stateful or {})
    if loader is not None:
        if LOADER_KEY in out:
            raise ValueError(
                f"stateful[{LOADER_KEY!r}] is where the data loader goes; name your object otherwise"
            )
        out[LOADER_KEY] = LoaderPosition(loader)
    return out


def _check_loader(loader: Any) -> None:
    if not callable(getattr(loader, "state_dict", None)) or not callable(
        getattr(loader, "load_state_dict", None)
    ):
        raise SavepointError(
            f"the data loader ({type(loader).__name__}) has no state_dict(): its position cannot be saved; {_FIX}"
        )
    from torch.utils.data import RandomSampler

    sampler = _sampler(loader)
    if isinstance(sampler, RandomSampler) and type(sampler).__name__ != "SeedableRandomSampler":
        raise SavepointError(
            "the data loader shuffles with a RandomSampler, whose order depends on its generator's history and "
            f"cannot be replayed by a resumed run; {_FIX}"
        )


def _sampler(loader: Any) -> Any:
    """The index sampler under accelerate's batch-sampler wrappers."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    while batch_sampler is not None and not hasattr(batch_sampler, "sampler"):
        batch_sampler = getattr(batch_sampler, "batch_sampler", None)
    return (
        getattr(batch_sampler, "sampler", None)
        if batch_sampler is not None
        else getattr(loader, "sampler", None)
    )
