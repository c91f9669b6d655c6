"""The exception hierarchy. Every error savepoint raises on bad input is a `SavepointError`.

Exceptions carry data (paths, keys, problems) so that the CLI and callers can format or act on them;
the message itself always says what is wrong, where, and what to do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class SavepointError(Exception):
    """Base class of every error savepoint raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one file of a checkpoint."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class CorruptCheckpointError(SavepointError):
    """A checkpoint's files are damaged, missing, unlisted or unsafe. `problems` names each one."""

    def __init__(self, checkpoint: str, problems: Sequence[Problem], hint: str | None = None) -> None:
        self.checkpoint = checkpoint
        self.problems = list(problems)
        self.hint = hint
        lines = "\n".join(f"  - {p}" for p in self.problems)
        hint = hint or (
            "restore an earlier checkpoint (restore(step='latest') falls back to the newest intact one), "
            "or delete this one"
        )
        super().__init__(
            f"checkpoint {checkpoint} is damaged ({len(self.problems)} problem(s)):\n{lines}\n{hint}"
        )

    def __reduce__(self) -> tuple[object, ...]:
        # Pickled between ranks (DCP gathers each rank's read errors): rebuild from the fields.
        return (type(self), (self.checkpoint, self.problems, self.hint))


class UnsafeCheckpointError(CorruptCheckpointError):
    """A file tries to leave its directory, is a symlink out of it, or would need unpickling."""


class IncompatibleCheckpointError(SavepointError):
    """A checkpoint is intact but does not fit what it is restored into (keys, shapes, base, version)."""

    def __init__(self, message: str, *, mismatches: Sequence[str] = ()) -> None:
        self.mismatches = list(mismatches)
        if self.mismatches:
            shown = "\n".join(f"  - {m}" for m in self.mismatches[:50])
            more = f"\n  ... and {len(self.mismatches) - 50} more" if len(self.mismatches) > 50 else ""
            message = f"{message}\n{shown}{more}"
        super().__init__(message)


class CheckpointNotFoundError(SavepointError):
    """The asked-for root, step or file does not exist."""


class StorageError(SavepointError):
    """Writing or reading the storage failed (disk full, quota, permissions, I/O error)."""


class UnsupportedStateError(SavepointError):
    """An object's state holds something savepoint will not serialize (it stores no pickles)."""


class LockedRootError(SavepointError):
    """Another live process holds the root as a writer."""


class MergeError(SavepointError):
    """A LoRA merge or export cannot be done as asked; nothing was written at the output."""
