"""A DeepSpeed engine's own checkpoint, taken at save() time and written later (async saves too).

DeepSpeed (0.19) sends every file of `engine.save_checkpoint` through `engine.checkpoint_engine`:
`create`, `makedirs`, `save(state_dict, path)`, `commit`, and, to decide who writes what,
`is_data_parallel_writer` and `preserves_storage_sharing`. `capture_engine_files` runs
`save_checkpoint` with a `RecordingEngine` in its place for that one call (restored on any exit): its
`save` writes nothing and keeps (path, state). DeepSpeed's collectives and barriers run as they always
do, on the training thread. With a pool, every tensor is copied into reused host buffers first, so
training may change the engine as soon as save() returns; without one (synchronous saves, written
right away on the same thread) the state is kept as DeepSpeed handed it over.

`write_engine_files` then `torch.save`s each state to its path in the staged directory, with the
serialization the engine's own checkpoint engine uses, and records (hashes) it: this rank's files,
exactly the ones it would have written. The copies keep what `torch.save` sees: every tensor storage
is copied whole (ZeRO keeps parameters as views of one flat buffer, and torch.save writes a view's
whole storage), views and aliases are rebuilt over the copies, so the files hold the bytes DeepSpeed
would have written at save() time (on GPU, the storages' recorded location says "cpu": DeepSpeed loads
them to the CPU either way).
"""

from __future__ import annotations

import copy
import os
import tempfile
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

from savepoint.errors import StorageError, UnsupportedStateError
from savepoint.snapshot import HostBufferPool, pool_for
from savepoint.storage.local import storage_error

# DeepSpeed copies these next to the checkpoint (not through the checkpoint engine); savepoint keeps
# checkpoints free of code (`savepoint consolidate` does their job).
RECOVERY_SCRIPTS = frozenset({"zero_to_fp32.py", "zero_to_torch.py"})


@dataclass
class EngineFiles:
    """One rank's files of one engine checkpoint: path below the save directory -> state to torch.save."""

    states: dict[str, Any] = field(default_factory=dict)
    zipfile_serialization: bool = True


class RecordingEngine(CheckpointEngine):
    """Stands in for the engine's checkpoint engine during one `save_checkpoint`: records, writes nothing.

    Who writes what is still the original engine's answer, so the recorded files are those it would
    have written (and, where it asks DeepSpeed to clone tensors first, the same compact copies)."""

    def __init__(self, original: Any, save_dir: str, tag: str, pool: HostBufferPool | None) -> None:
        super().__init__()
        self.tag = tag
        self.name = "savepoint"
        self.original = original
        self.save_dir = save_dir
        self.pool = pool
        self.files = EngineFiles(zipfile_serialization=getattr(original, "zipfile_serialization", True))

    def create(self, info: Any) -> None:
        pass

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        pass  # nothing is written now; the write phase makes each file's directory

    def save(self, state_dict: Any, path: str) -> None:
        relpath = os.path.relpath(os.path.abspath(path), self.save_dir)
        if relpath.startswith("..") or os.path.isabs(relpath):
            raise UnsupportedStateError(
                f"DeepSpeed saved {path}, outside its checkpoint directory {self.save_dir}"
            )
        relpath = relpath.replace(os.sep, "/")
        if self.pool is not None:  # buffers keyed by the name inside the tag: the same from step to step
            key = relpath.removeprefix(f"{self.tag}/")
            state_dict = HostSnapshot(self.pool, key).of(state_dict)
        self.files.states[relpath] = state_dict

    def load(self, path: str, map_location: Any = None) -> Any:
        raise UnsupportedStateError(
            f"DeepSpeed read {path} while saving a checkpoint; savepoint does not support that"
        )

    def commit(self, info: Any) -> bool:
        return True

    def is_data_parallel_writer(self, dp_rank: int) -> bool:
        return bool(self.original.is_data_parallel_writer(dp_rank))

    def is_decoupled(self) -> bool:
        return False  # save_checkpoint commits (a no-op here) before it returns

    def preserves_storage_sharing(self) -> bool:
        return bool(self.original.preserves_storage_sharing())


def capture_engine_files(engine: Any, tag: str, *, pool: HostBufferPool | None) -> EngineFiles:
    """Run `engine.save_checkpoint` for `tag` and return this rank's files, unwritten. Collective.

    With `pool`, every tensor is a host copy when this returns. DeepSpeed writes only its recovery
    scripts outside the checkpoint engine: into a scratch directory, removed here; anything else
    written there would be lost, so it is refused."""
    if engine.zero_nvme_offload_optimizer():
        raise UnsupportedStateError(
            "saving a DeepSpeed engine with zero_optimization.offload_optimizer.device=nvme is not supported: "
            "DeepSpeed copies the offloaded optimizer files itself, and savepoint could not restore them "
            "either; offload the optimizer to the CPU instead"
        )
    original = engine.checkpoint_engine
    with tempfile.TemporaryDirectory(prefix="savepoint-deepspeed-") as scratch:
        recorder = RecordingEngine(original, scratch, tag, pool)
        if pool is not None:
            pool.begin()
        engine.checkpoint_engine = recorder
        try:
            engine.save_checkpoint(scratch, tag=tag, client_state={}, save_latest=False)
        finally:
            engine.checkpoint_engine = original
            if pool is not None:
                pool.end()  # device copies complete; buffers this save did not use are dropped
        strays = sorted(set(os.listdir(scratch)) - RECOVERY_SCRIPTS)
        if strays:
            raise UnsupportedStateError(
                f"DeepSpeed wrote {strays} outside its checkpoint engine; savepoint cannot save that engine "
                "configuration"
            )
    return recorder.files


def write_engine_files(files: EngineFiles, staged: Any, base: str) -> None:
    """`torch.save` each recorded state to `base/<path>` in `staged` and record (hash) it."""
    for relpath, state in sorted(files.states.items()):
        target = f"{base}/{relpath}"
        full = staged.abspath(target)
        try:
            os.makedirs(os.path.dirname(full), exist_ok=True)
            # By path, as DeepSpeed does: torch names the archive inside the file after it.
            torch.save(state, full, _use_new_zipfile_serialization=files.zipfile_serialization)
        except OSError as exc:
            raise storage_error(exc, full, "writing") from exc
        except RuntimeError as exc:  # torch's file writer reports a failed open or write this way
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StorageError(
                f"writing {full} failed: {reason}; check the storage (space, permissions) and try again. "
                "Earlier checkpoints are intact."
            ) from exc
        staged.record(target)


# ---------------------------------------------------------------- host copies


_ENGINE_POOLS: weakref.WeakKeyDictionary[HostBufferPool, HostBufferPool] = weakref.WeakKeyDictionary()


def engine_pool(root: str) -> HostBufferPool:
    """The host buffers for engine files of checkpoint root `root`, reused from save to save.

    Separate from the root's own pool (whose snapshot keeps only the buffers it used itself), and tied
    to it: released with it (`snapshot.release_buffers`, when the manager closes)."""
    return _ENGINE_POOLS.setdefault(pool_for(root), HostBufferPool())


class HostSnapshot:
    """A copy of one state DeepSpeed saves: tensors in pooled host buffers (one per storage, keyed by the
    file and the first place the storage appears), containers rebuilt, other values deep-copied.
    Objects that appear twice stay one object, as torch.save's pickler would see them."""

    def __init__(self, pool: HostBufferPool, key: str) -> None:
        self.pool = pool
        self.key = key
        self.memo: dict[int, Any] = {}  # id(original) -> copy; the originals stay alive in `keep`
        self.storages: dict[int, torch.Tensor] = {}  # the storage's identity -> its host bytes
        self.keep: list[Any] = []

    def of(self, value: Any, where: str = "") -> Any:
        found = self.memo.get(id(value))
        if found is not None:
            return found
        copied = self._copy(value, where)
        self.memo[id(value)] = copied
        self.keep.append(value)
        return copied

    def _copy(self, value: Any, where: str) -> Any:
        if isinstance(value, torch.Tensor):
            return self._tensor(value, where)
        if isinstance(value, dict):
            out = copy.copy(value)  # the same mapping type (OrderedDict, defaultdict...), same keys
            for key, item in value.items():
                out[key] = self.of(item, f"{where}/{key}")
            return out
        if isinstance(value, list):
            out_list = copy.copy(value)
            out_list[:] = [self.of(item, f"{where}/{i}") for i, item in enumerate(value)]
            return out_list
        if isinstance(value, tuple) and not isinstance(value, torch.Size):
            items = [self.of(item, f"{where}/{i}") for i, item in enumerate(value)]
            return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
        return copy.deepcopy(value)  # immutable values come back as they are

    def _tensor(self, tensor: torch.Tensor, where: str) -> torch.Tensor:
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter) or tensor.layout != torch.strided:
            return copy.deepcopy(tensor)  # nothing DeepSpeed saves today; a copy all the same
        storage = tensor.untyped_storage()
        host = self.storages.get(storage._cdata)
        if host is None:
            whole = torch.empty(0, dtype=torch.uint8, device=tensor.device)
            whole.set_(storage, 0, (storage.nbytes(),), (1,))
            host = self.pool.copy(f"{self.key}:{where}", whole)
            self.storages[storage._cdata] = host
        out = torch.empty(0, dtype=tensor.dtype)
        out.set_(host.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())
        if isinstance(tensor, torch.nn.Parameter):
            out = torch.nn.Parameter(out, requires_grad=tensor.requires_grad)
        else:
            out.requires_grad_(tensor.requires_grad)  # pickled with the tensor (a view's flag too)
        # Python attributes are pickled with it too (ZeRO-3 tags its fp32 partitions with `ds_id`).
        out.__dict__.update({k: self.of(v, f"{where}.{k}") for k, v in tensor.__dict__.items()})
        return out
