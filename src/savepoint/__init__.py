"""savepoint: fast, crash-safe, Hugging Face-compatible checkpoints for LLM training.

import savepoint
mgr = savepoint.CheckpointManager("runs/exp1", save_every=500, keep_last=3,
                                  best_metric="eval_loss", best_mode="min", keep_best=1)
start = mgr.restore(model=model, optimizer=opt).step
...
mgr.maybe_save(step, model=model, optimizer=opt, metrics={"eval_loss": ev})
savepoint.save_pretrained(model, "export/", tokenizer=tok)
"""

from __future__ import annotations

from typing import Any

from savepoint.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    LockedRootError,
    MergeError,
    SavepointError,
    StorageError,
    UnsafeCheckpointError,
    UnsupportedStateError,
)
from savepoint.export import save_pretrained
from savepoint.manager import CheckpointManager
from savepoint.policy import CheckpointInfo, RetentionPolicy
from savepoint.restoring import RestoreResult
from savepoint.verify import verify

__version__ = "0.1.0"

__all__ = [
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "IncompatibleCheckpointError",
    "LockedRootError",
    "MergeError",
    "RestoreResult",
    "RetentionPolicy",
    "SavepointError",
    "StorageError",
    "UnsafeCheckpointError",
    "UnsupportedStateError",
    "merge_lora",
    "save_pretrained",
    "verify",
]


def merge_lora(adapter_dir: Any, *, base: Any, out: Any, dtype: Any = None) -> str:
    """Merge a LoRA adapter into its base and write a plain transformers model directory (see `savepoint.lora`)."""
    from savepoint.lora.merge import merge_lora as _merge_lora

    return _merge_lora(adapter_dir, base=base, out=out, dtype=dtype)
