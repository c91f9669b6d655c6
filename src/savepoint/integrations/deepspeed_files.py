"""Reading DeepSpeed's own checkpoint files (torch pickles) the only way savepoint allows.

DeepSpeed reads its files with `torch.load(..., weights_only=False)`: full pickle, which runs whatever
code the file names. A checkpoint may come from someone who controls every byte and recomputes every
checksum (DESIGN.md promise 4), so every DeepSpeed read savepoint triggers goes through `FileLoader`:

* only files of one directory, and (inside a savepoint checkpoint) only files its manifest lists:
  DeepSpeed builds file names from its config and from the tag, and a name outside that set is
  refused before anything is opened;
* opened below that directory without following symlinks, regular files only (`io.files`);
* decoded by torch's `weights_only` unpickler, which builds tensors, plain containers and the three
  DeepSpeed data classes allowed below, and nothing else; memory-mapped, so a file's tensors are not
  read until they are used.

Routes of DeepSpeed that call `torch.load` directly instead of through its checkpoint engine
(universal checkpoints, NVMe optimizer offload copying files out of the checkpoint) are refused by
`refuse_unsafe_options` with an error that names the option.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Collection, Iterator
from typing import Any

import torch

from savepoint.errors import Problem, SavepointError, UnsafeCheckpointError
from savepoint.io.files import open_fd_inside


def _safe_globals() -> list[Any]:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]  # plain data classes: no code runs on load


class FileLoader:
    """`torch.load` for DeepSpeed, confined to the files of `directory` (`listed`, when given).

    Call it as DeepSpeed calls `torch.load` / `checkpoint_engine.load`: `loader(path, map_location)`.
    `preload(names)` decodes files before any live object changes; the next request for each gets
    that result (each one once: DeepSpeed may change what it gets).
    """

    def __init__(
        self, directory: str, *, listed: Collection[str] | None = None, checkpoint: str | None = None
    ):
        self.directory = os.path.abspath(directory)
        self.listed = set(listed) if listed is not None else None
        self.checkpoint = checkpoint or directory
        self._ready: dict[str, Any] = {}

    def name_of(self, path: Any) -> str:
        full = os.path.abspath(os.fspath(path))
        name = os.path.relpath(full, self.directory)
        if (
            os.path.dirname(name)
            or name.startswith("..")
            or (self.listed is not None and name not in self.listed)
        ):
            raise UnsafeCheckpointError(
                self.checkpoint,
                [
                    Problem(
                        os.fspath(path),
                        "DeepSpeed asked to read a file that is not one of the checkpoint's listed files",
                    )
                ],
                hint="savepoint reads only files its manifest lists, inside the checkpoint's DeepSpeed directory",
            )
        return name

    def preload(self, names: Collection[str]) -> None:
        for name in sorted(names):
            self._ready[name] = self._load(name, "cpu")

    def __call__(self, path: Any, map_location: Any = None, *args: Any, **kwargs: Any) -> Any:
        name = self.name_of(path)
        if name in self._ready:
            return self._ready.pop(name)
        return self._load(name, map_location)

    def _load(self, name: str, map_location: Any) -> Any:
        fd, _ = open_fd_inside(self.directory, name)
        try:
            # The descriptor pins the file we checked; torch memory-maps it by this name (Linux).
            by_fd = f"/proc/self/fd/{fd}"
            source = by_fd if os.path.exists(by_fd) else os.path.join(self.directory, name)
            with torch.serialization.safe_globals(_safe_globals()):
                return torch.load(source, map_location=map_location or "cpu", weights_only=True, mmap=True)
        except SavepointError:
            raise
        except Exception as exc:  # the weights-only unpickler refused it, or it is no torch file
            raise UnsafeCheckpointError(
                self.checkpoint,
                [Problem(name, f"refused by torch's weights-only loader ({_reason(exc)})")],
                hint="savepoint reads DeepSpeed's files only through torch's weights_only unpickler",
            ) from exc
        finally:
            os.close(fd)


def _reason(exc: Exception) -> str:
    """The line of torch's message that says what was refused (not its advice to turn the check off)."""
    text = str(exc)
    found = re.search(r"Unsupported (?:global: GLOBAL \S+|[^.\n]*)", text)
    return f"{type(exc).__name__}: {found.group(0) if found else text.strip().splitlines()[0]}"[:300]


def refuse_unsafe_options(engine: Any, checkpoint: str) -> None:
    """Refuse engine settings under which DeepSpeed reads a checkpoint with plain pickle or copies out of it."""
    refused = []
    if engine.load_universal_checkpoint():
        refused.append(
            (
                "checkpoint.load_universal",
                "DeepSpeed reads universal checkpoints with torch.load(weights_only=False)",
            )
        )
    if engine.zero_nvme_offload_optimizer():
        refused.append(
            (
                "zero_optimization.offload_optimizer.device=nvme",
                "DeepSpeed copies the checkpoint's offloaded_tensors/ into its swap folder, following symlinks",
            )
        )
    if refused:
        option, why = refused[0]
        raise UnsafeCheckpointError(
            checkpoint,
            [Problem(option, why)],
            hint=f"restore with `{option}` turned off in the DeepSpeed config (savepoint refuses that route)",
        )


@contextlib.contextmanager
def engine_reads_through(engine: Any, loader: FileLoader) -> Iterator[None]:
    """Route every read of the engine's checkpoint engine through `loader` for one restore."""
    checkpoint_engine = engine.checkpoint_engine
    checkpoint_engine.load = loader  # an instance attribute shadows the method
    try:
        yield
    finally:
        del checkpoint_engine.load


class _TorchThrough:
    """`torch` as one DeepSpeed module sees it for a while: its `torch.load` is `loader`."""

    def __init__(self, loader: FileLoader) -> None:
        self.load = loader

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


@contextlib.contextmanager
def module_reads_through(module: Any, loader: FileLoader) -> Iterator[None]:
    """Route `module`'s own `torch.load` calls (DeepSpeed's zero_to_fp32) through `loader`."""
    original = module.torch
    module.torch = _TorchThrough(loader)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # it prints progress on stdout
            yield
    finally:
        module.torch = original
