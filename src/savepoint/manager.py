"""CheckpointManager: composes policy, formats, storage and manifest. Little logic of its own.

mgr = CheckpointManager("runs/exp1", save_every=500, keep_last=3, best_metric="eval_loss", keep_best=1)
start = mgr.restore(model=model, optimizer=opt).step          # 0 when there is nothing yet
mgr.maybe_save(step, model=model, optimizer=opt, metrics={"eval_loss": loss})
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from savepoint import discovery, distributed, policy
from savepoint.errors import CheckpointNotFoundError, CorruptCheckpointError
from savepoint.io.priority import writer_policy
from savepoint.manifest import clean_metrics
from savepoint.pipeline.job import SaveRequest
from savepoint.pipeline.save import capture, write_checkpoint
from savepoint.pipeline.sources import is_collective
from savepoint.policy import BestMode, CheckpointInfo, RetentionPolicy
from savepoint.restore_agreement import restore_agreed
from savepoint.restoring import RestoreResult, restore_checkpoint
from savepoint.storage import memory_tier
from savepoint.storage.local import delete_checkpoint_dir, sweep_stale
from savepoint.storage.lock import RootLock
from savepoint.storage.remote import RemoteRoot, is_remote_url


class CheckpointManager:
    """Saves, lists, restores and prunes the checkpoints of one training run under `root`.

    Args:
        root: directory of the run; created on first save.
        save_every: `maybe_save` saves when `step % save_every == 0`.
        keep_last / keep_best / keep_every: retention rules (see `RetentionPolicy`); the latest
            and the best checkpoint are never deleted.
        best_metric / best_mode: which metric ranks checkpoints, and whether lower or higher is better.
        async_save: return from `save()` after a memory snapshot and write in the background:
            True (or "thread") on a thread of this process; "process" in a separate writer process
            fed from shared memory, which keeps the training cores free and commits a save that was
            handed over even if this process is killed (local roots). Under torchrun, True makes
            every rank snapshot and return; each rank's thread writes, reports and commits on
            savepoint's own process group, one save in flight, and `wait()` or the next `save()`
            raises a failure on every rank (DDP, FSDP1, FSDP2, DeepSpeed engines, plain models);
            "process" does the same there (a commit that needs every rank's report cannot be left
            to a writer process that outlives its trainer), with a warning.
            Call `wait()` before `save_pretrained` while a save is in flight. The writer runs at
            a lower priority (nice; the writer process SCHED_IDLE outside torchrun; the
            SAVEPOINT_WRITER_PRIORITY environment variable overrides it, see io/priority.py).
        dist_timeout: under torchrun, seconds a rank waits for the others at each step of a save
            before it raises instead of hanging (a rank died or stalled); it must exceed the longest
            time one rank spends writing its part. Default: $SAVEPOINT_DIST_TIMEOUT or 600.
        sharded_model: for sharded (FSDP) models, write the weights as each rank's shards through
            DCP instead of gathering them to rank 0: faster saves of large models, but the checkpoint
            is no transformers directory until `savepoint consolidate` makes one.
        max_shard_size: model weights are split into shards of at most this size, named as
            transformers names them. Smaller shards let unchanged (frozen) parts of a model be
            hardlinked from the previous checkpoint instead of written again.
        memory_tier: also keep the newest committed checkpoint in shared memory (/dev/shm), so a
            process restarted on this machine after a crash restores from memory, once the copy's
            manifest matches the committed one (one process; see storage/memory_tier.py). It costs
            host memory as large as a checkpoint; `close()` frees it.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        save_every: int | None = None,
        keep_last: int | None = None,
        keep_best: int | None = None,
        best_metric: str | None = None,
        best_mode: BestMode = "min",
        keep_every: int | None = None,
        async_save: bool | str = False,
        dist_timeout: float | None = None,
        sharded_model: bool = False,
        max_shard_size: int | str = "5GB",
        memory_tier: bool = False,
    ) -> None:
        self.root = os.fspath(root)
        if save_every is not None and (not isinstance(save_every, int) or save_every < 1):
            raise ValueError(f"save_every must be a positive integer or None, got {save_every!r}")
        self.save_every = save_every
        self.policy = RetentionPolicy(
            keep_last=keep_last,
            keep_best=keep_best,
            best_metric=best_metric,
            best_mode=best_mode,
            keep_every=keep_every,
        )
        self.async_save = async_save
        self.dist_timeout = dist_timeout
        self.sharded_model = sharded_model
        self.max_shard_size = max_shard_size
        self.memory_tier = memory_tier
        self._opened = False
        # Object stores (any fsspec URL but file://): saves are committed in a local staging dir, then
        # uploaded with the manifest object last; see storage/remote.py. No root lock there.
        self._remote = RemoteRoot(self.root) if is_remote_url(self.root) else None
        self._write_root = self._remote.staging_dir if self._remote else self.root
        self._remote_swept = False
        if self._remote is None:
            discovery.check_root(self.root, must_exist=False)
        self._lock = RootLock(self.root)
        self._writer: Any = None
        self._warned_process_on_thread = False
        self._warned_tier = False
        if async_save not in (False, None):
            writer_policy()  # a bad SAVEPOINT_WRITER_PRIORITY is refused here, not in the writer
        self._thread_writer: Any = None  # a process writer's stand-in for collective saves
        if async_save == "process":
            if self._remote is not None:
                raise ValueError('async_save="process" writes local roots only; use async_save=True here')
            if distributed.is_distributed() and distributed.world_size() > 1:
                self._warn_process_mode_on_a_thread()
                self._writer = self._new_thread_writer()  # no writer process to start on every rank
            else:
                from savepoint.async_writer import ProcessWriter

                self._writer = ProcessWriter()
                self._writer.memory_tier = memory_tier
        elif async_save in (True, "thread"):
            self._writer = self._new_thread_writer()
        elif async_save not in (False, None):
            raise ValueError(f'async_save must be False, True, "thread" or "process", got {async_save!r}')

    # ------------------------------------------------------------ discovery

    @property
    def checkpoints(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest first (read from the manifests on disk)."""
        if self._remote is not None:
            return self._remote.list_checkpoints()
        return discovery.list_checkpoints(self.root)

    @property
    def latest_step(self) -> int | None:
        infos = self.checkpoints
        return infos[-1].step if infos else None

    @property
    def best_step(self) -> int | None:
        return policy.best_step(self.checkpoints, self.policy.best_metric, self.policy.best_mode)

    # ------------------------------------------------------------ saving

    def maybe_save(self, step: int, **kwargs: Any) -> str | None:
        """Save when the schedule (`save_every`) says so; return the checkpoint path, or None."""
        if not policy.should_save(step, self.save_every):
            return None
        return self.save(step, **kwargs)

    def save(
        self,
        step: int,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        tokenizer: Any = None,
        stateful: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
        final: bool = False,
    ) -> str:
        """Write checkpoint `step` atomically, then apply retention. Returns its final path.

        With `async_save=True` this returns once the state is snapshotted; `wait()` makes it durable.
        """
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        self.wait()
        self._open_for_writing()
        request = SaveRequest(
            root=self._write_root,
            step=step,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            tokenizer=tokenizer,
            stateful=dict(stateful or {}),
            metrics=clean_metrics(metrics),
            extra=dict(extra or {}),
            final=final,
            # Only rank 0 writes a manifest: W ranks listing the root (W listings of a bucket) for nothing.
            parent=self._parent_name(step) if distributed.rank() == 0 else None,
            max_shard_size=self.max_shard_size,
        )
        # Every save is the same pipeline (pipeline/save.py): capture now, then write and commit, here or
        # on the async writer. Under torchrun every rank calls save() and writes its part.
        writer = self._writer_for(model)
        records = writer is not None and self._records_plan(writer, model)  # snapshots into its arena
        job = capture(
            request,
            snapshot=writer is not None and not records,
            timeout=self.dist_timeout,
            sharded_model=self.sharded_model,
        )
        if records:
            writer.submit_job(job, self.policy)
        elif writer is not None:
            writer.submit(lambda: self._write_and_prune(job))
        else:
            self._write_and_prune(job)
        return os.path.join(self.root, discovery.step_dir_name(step))

    def _writer_for(self, model: torch.nn.Module) -> Any:
        """async_save's writer for this save: a collective save (torchrun, a sharded model, a DeepSpeed
        engine) commits with every rank's report, which a writer process that outlives its trainer
        cannot wait for, so with async_save="process" it runs on a writer thread instead (said once)."""
        if not getattr(self._writer, "out_of_process", False) or not is_collective(model):
            return self._writer
        if self._thread_writer is None:
            self._warn_process_mode_on_a_thread()
            self._thread_writer = self._new_thread_writer()
        return self._thread_writer

    def _new_thread_writer(self) -> Any:
        from savepoint.async_writer import ThreadWriter

        writer = ThreadWriter()
        writer.memory_tier = self.memory_tier
        return writer

    def _warn_process_mode_on_a_thread(self) -> None:
        if not self._warned_process_on_thread:
            warnings.warn(
                'async_save="process": this save is collective (torchrun, a sharded model or a DeepSpeed '
                "engine), and its commit needs every rank's report, which a writer process cannot wait "
                "for once its trainer is gone; it is written on a writer thread instead, as with "
                "async_save=True (it does not survive a killed trainer)",
                stacklevel=4,
            )
            self._warned_process_on_thread = True

    def _records_plan(self, writer: Any, model: torch.nn.Module) -> bool:
        """Whether `writer` records this save into its arena and writes that (async_writer.py): the process
        writer always; the thread writer for one process, a local root and state in host memory (the
        rest takes pooled host copies, pinned for GPU state, and the pipeline's write on the thread)."""
        if getattr(writer, "out_of_process", False):
            return True
        if not getattr(writer, "records_plan", False) or self._remote is not None or is_collective(model):
            return False
        return all(p.device.type == "cpu" for p in model.parameters())

    def wait(self) -> None:
        """Block until the save in flight (if any) is durable; raise its error if it failed."""
        if self._thread_writer is not None:
            self._thread_writer.wait()
        if self._writer is not None:
            self._writer.wait()

    def close(self, *, keep_memory_tier: bool = False) -> None:
        """Finish any save in flight and release the root (and the memory tier, unless kept)."""
        try:
            self.wait()
        finally:
            if self.memory_tier and not keep_memory_tier:
                memory_tier.drop(self.root)
            self._lock.release()
            self._opened = False
            if getattr(self._writer, "out_of_process", False):
                self._writer.close()  # stops the writer process, frees its shared memory
            if self._writer is not None:
                from savepoint.snapshot import release_buffers

                release_buffers(self._write_root)  # the host copies are as large as the state
            for writer in (self._writer, self._thread_writer):
                if writer is not None and not getattr(writer, "out_of_process", False):
                    writer.release()  # and so is the thread writer's arena

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(keep_memory_tier=exc_type is not None)  # a crash keeps it for the restart

    def _open_for_writing(self) -> None:
        if self._remote is not None:
            if not self._remote_swept:  # one writer per remote root: what has no manifest is a dead upload
                distributed.on_rank0(
                    self._remote.sweep, timeout=self.dist_timeout, what=f"sweeping {self.root}"
                )
                self._remote_swept = True
            return
        if self._opened:
            return

        def open_root() -> None:
            os.makedirs(self.root, exist_ok=True)
            self._lock.acquire()
            # Only the lock holder may sweep: anything temporary here is ours or a dead writer's.
            sweep_stale(self.root)

        # Under torchrun rank 0 alone locks and sweeps, and the others wait for it (no rank may start
        # writing into a temp dir the sweep could remove).
        distributed.on_rank0(open_root, timeout=self.dist_timeout, what=f"opening {self.root} for writing")
        self._opened = True

    def _parent_name(self, step: int) -> str | None:
        earlier = [i for i in self.checkpoints if i.step < step]
        return os.path.basename(earlier[-1].path) if earlier else None

    def _write_and_prune(self, job: Any) -> None:
        try:
            path = write_checkpoint(job)
        finally:
            if self._remote is not None and distributed.is_distributed():
                self._remote.clear_staging()  # every rank staged (and uploaded) its own part
        if distributed.rank() == 0:
            self._publish_and_prune(path, job.request.step)

    def _publish_and_prune(self, path: str, step: int) -> None:
        if self._uses_memory_tier() and not is_remote_url(path):
            memory_tier.publish(self.root, path)
        if self._remote is not None and not is_remote_url(path):  # collective saves upload as they commit
            try:
                self._remote.upload_checkpoint(path)
            finally:
                delete_checkpoint_dir(path)
        self._apply_retention(protect=step)

    def _apply_retention(self, *, protect: int) -> None:
        infos = self.checkpoints
        for step in policy.steps_to_delete(infos, self.policy):
            if step == protect:
                continue
            info = next(i for i in infos if i.step == step)
            try:
                (self._remote.delete if self._remote else delete_checkpoint_dir)(info.path)
            except OSError as exc:  # a failed deletion must never fail the save that just committed
                warnings.warn(
                    f"could not delete {info.path} ({exc}); it will be retried on the next save", stacklevel=3
                )

    # ------------------------------------------------------------ restoring

    def restore(
        self,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        stateful: Mapping[str, Any] | None = None,
        step: int | str = "latest",
    ) -> RestoreResult:
        """Load checkpoint `step` ("latest", "best" or a number) into the given objects.

        "latest" skips damaged checkpoints (with a warning) for the newest intact one and returns
        step 0, touching nothing, when there is none. An explicit step that is damaged raises
        `CorruptCheckpointError` naming the files.
        """
        self.wait()
        targets = dict(model=model, optimizer=optimizer, scheduler=scheduler, stateful=dict(stateful or {}))
        if distributed.world_size() > 1:
            return self._restore_agreed(targets, step)
        if step == "latest":
            return self._restore_latest(targets)
        return self._restore_from(self._resolve_step(step), targets)

    def _restore_from(self, path: str, targets: dict[str, Any]) -> RestoreResult:
        """Restore checkpoint `path`: from the memory tier's copy when it holds exactly this commit, else
        from the root (downloaded for remote roots). Damage raises CorruptCheckpointError, nothing changed."""
        held = memory_tier.held_copy(self.root, path, self._remote) if self._uses_memory_tier() else None
        if held is not None:
            try:
                return dataclasses.replace(restore_checkpoint(held, **targets), path=path)
            except CorruptCheckpointError as exc:  # the disk's copy is the one that counts
                warnings.warn(
                    f"the memory tier's copy is damaged, reading {path} instead: {exc}", stacklevel=4
                )
        with self._remote.local_copy(path) if self._remote else contextlib.nullcontext(path) as local:
            return dataclasses.replace(restore_checkpoint(local, **targets), path=path)

    def _uses_memory_tier(self) -> bool:
        if self.memory_tier and distributed.world_size() > 1 and not self._warned_tier:
            warnings.warn(
                "memory_tier serves one process; under torchrun restores read the disk", stacklevel=4
            )
            self._warned_tier = True
        return self.memory_tier and distributed.world_size() == 1

    def _restore_latest(self, targets: dict[str, Any]) -> RestoreResult:
        # Each file is checked in the read that loads it; damage surfaces before anything changes.
        for info in reversed(self.checkpoints):
            try:
                return self._restore_from(info.path, targets)
            except CorruptCheckpointError as exc:
                warnings.warn(
                    f"{CorruptCheckpointError(info.path, exc.problems, hint='falling back to the previous checkpoint')}",
                    stacklevel=3,
                )
        return RestoreResult(step=0)

    def _restore_agreed(self, targets: dict[str, Any], step: int | str) -> RestoreResult:
        def candidates() -> list[int]:  # run on rank 0 only
            if step == "latest":
                return [i.step for i in reversed(self.checkpoints)]
            self._resolve_step(step)  # a step that is not there is an error, raised on every rank
            return [self.best_step if step == "best" else step]  # type: ignore[list-item]

        return restore_agreed(
            self.root,
            self._remote,
            targets,
            candidates=candidates,
            sees_any=lambda: bool(self.checkpoints),
            latest=step == "latest",
            timeout=self.dist_timeout,
        )

    def _resolve_step(self, step: int | str) -> str:
        infos = self.checkpoints
        if step == "best":
            best = policy.best_step(infos, self.policy.best_metric, self.policy.best_mode)
            if best is None:
                raise CheckpointNotFoundError(
                    f"no best checkpoint under {self.root}: "
                    + (
                        "set best_metric on the manager"
                        if self.policy.best_metric is None
                        else f"no checkpoint reports metric {self.policy.best_metric!r}"
                    )
                )
            step = best
        if not isinstance(step, int) or isinstance(step, bool):
            raise ValueError(f"step must be 'latest', 'best' or an integer, got {step!r}")
        return discovery.step_path(self.root, step, infos, remote=self._remote is not None)
