"""Saving and restoring inside a `torchrun` job: every rank calls the same API, savepoint decides who
writes what, and nothing is committed unless every rank wrote its part.

What each rank writes into the one temporary directory (its name is chosen by rank 0 and broadcast):

    rank 0       config.json, model*.safetensors (the full state dict, gathered to its CPU),
                 tokenizer files, metrics.json, train_state/{scheduler,extra,optimizer_groups}.json,
                 train_state/dcp/.metadata, then savepoint.json (the manifest) and the rename
    every rank   train_state/dcp/__<rank>_0.distcp (its optimizer shards, written in parallel through
                 DCP; never gathered), train_state/rng/rank-<rank>.*, train_state/stateful/rank-<rank>/*

A save runs in phases separated by votes on savepoint's gloo group (`distributed.agree`): capture
(user code runs: state_dict() of stateful objects), gather + DCP write (collectives), local writes,
then a gather that carries each rank's vote and (path, size, checksum) list to rank 0, which stats
(never reads) the other ranks' files, writes the manifest, commits and broadcasts the outcome. A rank that raises or dies makes every other rank raise within the timeout;
rank 0 removes the temporary directory, and the previous checkpoint is untouched.
"""

from __future__ import annotations

import json
import os
import secrets
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import torch

from savepoint import distributed
from savepoint.discovery import step_dir_name
from savepoint.distributed import DistributedSaveError, agree, broadcast, is_sharded, rank, unwrap_optimizer
from savepoint.errors import IncompatibleCheckpointError, SavepointError, UnsupportedStateError
from savepoint.formats import hf, sharded, train_state
from savepoint.formats import stateful as stateful_format
from savepoint.io.files import read_bytes_inside
from savepoint.manifest import Manifest, build_manifest, verify_files
from savepoint.saving import checkpoint_manifest, is_peft_model
from savepoint.storage.local import StagedDir, fsync_dir, storage_error

_TS = train_state.TRAIN_STATE_DIR


class SharedStagedDir(StagedDir):
    """The temporary directory every rank writes into: rank 0 creates and commits it, the others join it."""

    others_files: frozenset[str] = frozenset()  # relpaths other ranks reported (set by take_reports)

    @classmethod
    def join(cls, parent: str, final_name: str, path: str) -> SharedStagedDir:
        staged = cls.__new__(cls)
        staged.parent, staged.final_name, staged.path, staged.entries = parent, final_name, path, {}
        return staged

    def record_unlisted(self) -> None:
        # Other ranks write train_state/ at the same time; each records its own files there.
        for dirpath, dirs, files in os.walk(self.path):
            if dirpath == self.path and _TS in dirs:
                dirs.remove(_TS)
            for name in files:
                rel = os.path.relpath(os.path.join(dirpath, name), self.path).replace(os.sep, "/")
                if rel not in self.entries:
                    self.record(rel)

    def take_reports(self, reports: list[dict[str, tuple[int, str]]]) -> None:
        """Rank 0 lists every other rank's files as reported: it stats them (`_check_reported`), never
        reads them. Two ranks reporting one path with different contents is refused."""
        self.others_files = frozenset(
            rel for other, entries in enumerate(reports) if other for rel in entries
        )
        for other, entries in enumerate(reports):
            if other == 0:
                continue
            _check_reported(self, other, entries)
            for relpath, entry in entries.items():
                if self.entries.setdefault(relpath, entry) != entry:
                    raise DistributedSaveError(
                        f"rank {other} and another rank both wrote {relpath} in {self.path} with different "
                        "contents; nothing was committed.",
                        failed={other: f"wrote {relpath}, which another rank also wrote"},
                    )

    def dirs_to_sync(self) -> Iterator[str]:
        """Rank 0 skips a directory that holds only other ranks' files: they fsynced it before reporting
        (`_sync_own_dirs`), so the commit makes O(1) directory syncs, not one per rank's directory."""
        for dirpath, dirs, files in os.walk(self.path):
            rels = (os.path.relpath(os.path.join(dirpath, n), self.path).replace(os.sep, "/") for n in files)
            if dirs or not files or not all(rel in self.others_files for rel in rels):
                yield dirpath

    def cover_rest(self) -> None:
        """One walk, names only: rank 0 hashes its own unlisted files (outside train_state/, where no other
        rank writes); a file under train_state/ that no rank reported fails the save."""
        strays = []
        for dirpath, _dirs, files in os.walk(self.path):
            for name in files:
                rel = os.path.relpath(os.path.join(dirpath, name), self.path).replace(os.sep, "/")
                if rel in self.entries or rel == ROOT_CHECK_NAME:
                    continue
                if rel.startswith(_TS + "/"):
                    strays.append(rel)
                else:
                    self.record(rel)
        if strays:
            raise DistributedSaveError(
                f"{len(strays)} file(s) in {self.path} were reported by no rank: {', '.join(sorted(strays)[:5])}. "
                "A library wrote files savepoint does not know about (a new torch or DeepSpeed layout?); "
                "nothing was committed. Please report this with your torch version.",
            )


def per_rank_stateful_relbase(name: str, rank_: int) -> str:
    from savepoint.saving import stateful_relbase

    base = stateful_relbase(name)
    return f"{os.path.dirname(base)}/rank-{rank_:05d}/{os.path.basename(base)}"


# ---------------------------------------------------------------- saving


ROOT_CHECK_NAME = ".savepoint-root-check"  # rank 0's proof that every rank sees its temp dir; never committed


def _open_staged(parent: str, final_name: str, *, timeout: float | None, what: str) -> SharedStagedDir:
    """Rank 0 creates the temp dir; every rank proves it sees it before anyone writes a byte.

    Two nodes with the same root path on separate local disks would otherwise each write into their
    own copy, and rank 0 would commit a manifest listing files that are not there."""
    opened, error = None, None
    if rank() == 0:
        try:
            staged0 = SharedStagedDir(parent, final_name)
            opened = (os.path.basename(staged0.path), secrets.token_hex(16))
            staged0.write_bytes(ROOT_CHECK_NAME, opened[1].encode())
        except BaseException as exc:
            error = exc
    try:
        name, nonce = agree(error, opened, timeout=timeout, what=what)[0]
    except BaseException:
        if opened is not None:
            SharedStagedDir.join(parent, final_name, os.path.join(parent, opened[0])).abort()
        raise
    # Each rank joins under its own root string: the temp dir's name is all rank 0 tells it.
    path = os.path.join(parent, name)
    staged = SharedStagedDir.join(parent, final_name, path)
    error = None
    try:
        _check_sees(parent, path, nonce, timeout)
    except BaseException as exc:
        error = exc
    try:
        agree(error, timeout=timeout, what=what)
    except BaseException:
        if rank() == 0:
            staged.abort()
        raise
    if rank() == 0:  # everybody has read it: it must not be committed (`_commit` tries again)
        with suppress(OSError):
            os.remove(staged.abspath(ROOT_CHECK_NAME))
    return staged


def _check_sees(root: str, path: str, nonce: str, timeout: float | None) -> None:
    """Read back rank 0's nonce file, retrying briefly: a shared filesystem's attribute cache may lag."""
    deadline = time.monotonic() + min(5.0, float(timeout or distributed.DEFAULT_TIMEOUT) / 4)
    while True:
        try:
            seen = read_bytes_inside(path, ROOT_CHECK_NAME, max_bytes=1024).decode(errors="replace")
            problem = None if seen == nonce else f"it holds {seen[:40]!r}, not what rank 0 wrote"
        except (OSError, SavepointError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        if problem is None:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    raise DistributedSaveError(
        f"rank {rank()} does not see the file rank 0 wrote in {path} ({problem}): the checkpoint root {root} "
        "is not one directory shared by every rank (e.g. each node has its own local disk under the same "
        "path), so rank 0 cannot commit the other ranks' files. Use a root every rank sees: a shared "
        "filesystem (NFS, Lustre, a mounted bucket) or an object-store root (s3://...); nothing was committed."
    )


def _capture_local(request: Any) -> dict[str, tuple[bytes, dict[str, torch.Tensor]]]:
    """This rank's small state (user code runs here): RNG and stateful objects; on rank 0 also scheduler/extra."""
    from savepoint.saving import rng_relbase, stateful_relbase

    many = distributed.world_size() > 1
    blobs = {rng_relbase(rank()): train_state.encode_blob(train_state.rng_state(), "rng")}
    for name, obj in request.stateful.items():
        relbase = per_rank_stateful_relbase(name, rank()) if many else stateful_relbase(name)
        blobs[relbase] = train_state.encode_blob(stateful_format.capture(obj), f"stateful[{name!r}]")
    if rank() == 0:
        if request.scheduler is not None:
            blobs[f"{_TS}/scheduler"] = train_state.encode_blob(request.scheduler.state_dict(), "scheduler")
        if request.extra:
            blobs[f"{_TS}/extra"] = train_state.encode_blob(request.extra, "extra")
    return blobs


def _optimizer_parts(model: torch.nn.Module, optimizer: Any) -> tuple[dict[str, torch.Tensor] | None, Any]:
    """(DCP tensors, JSON rest) for sharded models; (None, name-keyed blob state) for replicated ones."""
    optimizer = unwrap_optimizer(optimizer)
    if is_sharded(model):
        tensors, rest = sharded.split_optimizer_state(sharded.optimizer_state(model, optimizer))
        return tensors, rest
    return None, train_state.optimizer_state(optimizer, model) if rank() == 0 else None


def save_collective(request: Any, *, timeout: float | None = None, sharded_model: bool = False) -> str:
    """Write checkpoint `request.step` from every rank; rank 0 commits once all ranks wrote their part.

    With `sharded_model` (and a sharded model) the weights go into the DCP directory as each rank's
    shards instead of being gathered to rank 0; the manifest's kind is then "sharded".
    """
    from savepoint.integrations import deepspeed as ds

    if ds.is_engine(request.model):
        return ds.save(request, timeout=timeout)
    what = f"save of step {request.step} under {request.root}"
    model = hf.unwrap_model(request.model)
    adapter = is_peft_model(model)
    sharded_model = sharded_model and is_sharded(model) and not adapter  # adapters are small: always gathered
    if adapter and is_sharded(model):  # the same verdict on every rank, before anything collective
        _check_sharded_adapter(model, request)
    staged = _open_staged(request.root, step_dir_name(request.step), timeout=timeout, what=what)
    try:
        blobs, error = {}, None
        try:
            blobs = _capture_local(request)
        except BaseException as exc:
            error = exc
        agree(error, timeout=timeout, what=what)  # nobody enters a collective after a rank failed
        gather = is_sharded(model) and not sharded_model and not adapter
        adapter_state = None
        with distributed.peer_failures(what, "gathering the weights to rank 0"):
            full = distributed.full_model_state(model) if gather else None  # collective
            if adapter and is_sharded(
                model
            ):  # collective: the adapter to rank 0, the full base's fingerprint
                from savepoint.lora.sharded import gather_adapter_states, prime_fingerprint

                prime_fingerprint(model)
                adapter_state = gather_adapter_states(model)
        opt_tensors, opt_rest = (None, None)
        if request.optimizer is not None:
            opt_tensors, opt_rest = _optimizer_parts(model, request.optimizer)
        dcp_tensors = {**(sharded.model_tensors(model) if sharded_model else {}), **(opt_tensors or {})}
        error, base_model = None, None
        try:
            if dcp_tensors:
                sharded.write_dcp(staged, dcp_tensors, timeout=timeout)  # collective; DCP raises on all ranks
            if rank() == 0:
                base_model = _write_rank0(
                    request,
                    model,
                    staged,
                    full,
                    opt_rest,
                    sharded_optimizer=opt_tensors is not None,
                    sharded_model=sharded_model,
                    adapter_state=adapter_state,
                )
            for relbase, (doc, tensors) in blobs.items():
                train_state.write_blob(staged, relbase, doc, tensors)
        except BaseException as exc:
            error = exc
        kind = (
            "sharded"
            if sharded_model
            else "adapter"
            if adapter
            else "model"
            if hf.is_transformers_model(_hf_model(model))
            else "module"
        )
        return _commit(staged, error, request, kind, base_model, timeout=timeout, what=what)
    except BaseException:
        if rank() == 0:
            staged.abort()
        raise


def _write_rank0(
    request: Any,
    model: torch.nn.Module,
    staged: StagedDir,
    full: dict[str, torch.Tensor] | None,
    opt_rest: Any,
    *,
    sharded_optimizer: bool,
    sharded_model: bool,
    adapter_state: dict[str, dict[str, torch.Tensor]] | None = None,
) -> dict[str, Any] | None:
    """Rank 0's files; returns the manifest's `base_model` for LoRA adapters."""
    base_model = None
    if sharded_model:
        _write_config_only(model, staged, request.tokenizer)
    elif is_peft_model(model):
        from savepoint.saving import SaveJob, _write_adapter

        base_model = _write_adapter(
            SaveJob(request=request, model_state=None, blobs={}, adapter=model, adapter_state=adapter_state),
            staged,
        )
    else:
        state = savable(_hf_model(model), full) if full is not None else hf.savable_state_dict(model)
        hf.write_model_files(_hf_model(model), staged, tokenizer=request.tokenizer, state=state)
        del state, full
    if request.optimizer is not None:
        relbase = sharded.GROUPS_BLOB if sharded_optimizer else f"{_TS}/optimizer"
        train_state.write_blob(staged, relbase, *train_state.encode_blob(opt_rest, "optimizer"))
    metrics = {"step": request.step, **request.metrics}
    staged.write_bytes("metrics.json", json.dumps(metrics, indent=1).encode())
    return base_model


def _check_sharded_adapter(model: torch.nn.Module, request: Any) -> None:
    from savepoint.lora.sharded import uses_dtensor

    if not uses_dtensor(model):
        raise UnsupportedStateError(
            "saving the LoRA adapter of an FSDP1 (FullyShardedDataParallel) model is not supported; shard the "
            "PeftModel with FSDP2 (`fully_shard`) or wrap it with DDP instead (adapters are small)"
        )
    if request.final:
        raise UnsupportedStateError(
            "final=True (merging the adapter into the base) is not supported for a sharded model: save without "
            "final=True, then run `savepoint merge-lora CKPT --base BASE_DIR --out OUT` on one machine"
        )


def _write_config_only(model: torch.nn.Module, staged: StagedDir, tokenizer: Any) -> None:
    """config.json, generation_config.json and the tokenizer, for `savepoint consolidate` to complete."""
    if hf.is_transformers_model(model):
        hf._write_config(model, staged, None)
    if tokenizer is not None:
        tokenizer.save_pretrained(staged.path)
    staged.record_unlisted()


def _hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The user's model inside an FSDP1 root wrapper, for config and tied-weight names: torch's full state
    dict of FSDP1 already has the wrapper's `_fsdp_wrapped_module.` prefixes removed, and nothing here may
    call the wrapper's own state_dict() on rank 0 alone (it is collective)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    while isinstance(model, FullyShardedDataParallel):
        model = model.module
    return model


def savable(model: torch.nn.Module, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A gathered full state dict as it goes on disk: tied weights once, named as transformers expects."""
    if hf.is_transformers_model(model):
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        return remove_tied_weights_from_state_dict(full, model)  # type: ignore[arg-type]
    return hf._drop_aliases(full)[0]


def _commit(
    staged: SharedStagedDir,
    error: BaseException | None,
    request: Any,
    kind: str,
    base_model: dict[str, Any] | None,
    *,
    timeout: float | None,
    what: str,
) -> str:
    """Every rank sends its vote and its (path, size, checksum) list to rank 0 (a gather); rank 0 writes
    the manifest over them without reading another rank's bytes, renames, and tells every rank."""
    final, reports = None, None
    failure: BaseException | None = None
    if error is None and rank() != 0:
        try:
            _sync_own_dirs(staged)
        except BaseException as exc:
            error = exc
    try:
        reports = distributed.gather_to_rank0(error, dict(staged.entries), timeout=timeout, what=what)
    except DistributedSaveError as exc:
        if rank() != 0:
            raise  # lost contact with rank 0: nobody is left to tell us the outcome
        failure = exc
    except BaseException as exc:
        failure = exc
    if rank() != 0:
        failure = error  # raised after the broadcast, which rank 0 is waiting to send
    if rank() == 0 and failure is None and reports is not None:
        try:
            with suppress(FileNotFoundError):
                os.remove(staged.abspath(ROOT_CHECK_NAME))
            staged.take_reports(reports)
            staged.cover_rest()
            manifest = checkpoint_manifest(request, kind, staged.entries, base_model)
            final = staged.commit(manifest.to_json(), replace=True)
        except BaseException as exc:
            failure = exc
    outcome = None
    if rank() == 0 and failure is not None:
        failed = failure.failed if isinstance(failure, DistributedSaveError) else {0: ""}
        message = (
            str(failure) if isinstance(failure, DistributedSaveError) else distributed.describe_error(failure)
        )
        outcome = (message, failed)
    try:
        final_seen, outcome = broadcast((final, outcome), timeout=timeout, what=what)
    except DistributedSaveError:
        if final is not None:  # committed: the checkpoint is whole even if a peer vanished since its vote
            warnings.warn(f"{what}: committed, but another rank stopped answering afterwards", stacklevel=3)
            return final
        if failure is not None:
            raise failure from None
        raise
    if failure is not None:
        raise failure  # rank 0's own error, or a peer's, or this rank's own
    if outcome is not None:
        message, failed = outcome
        if failed.get(0) == "":
            message = f"{what} failed on rank 0, nothing was committed: {message}"
            failed = {0: message}
        raise DistributedSaveError(message, failed=failed)
    return final_seen


def _sync_own_dirs(staged: SharedStagedDir) -> None:
    """Make this rank's new directory entries durable before it reports them (the writer syncs its own
    writes, which a network filesystem needs too); rank 0 then skips the directories only others wrote."""
    for path in sorted({os.path.dirname(staged.abspath(rel)) for rel in staged.entries}):
        try:
            fsync_dir(path)
        except OSError as exc:
            raise storage_error(exc, path, "syncing") from exc


def _check_reported(staged: SharedStagedDir, other: int, entries: Mapping[str, tuple[int, str]]) -> None:
    """Rank 0 lists another rank's file only once it sees it, at the size reported (a stat, no read)."""
    missing = []
    for relpath, (size, _) in entries.items():
        try:
            seen = os.stat(staged.abspath(relpath)).st_size
        except OSError:
            seen = None
        if seen != size:
            missing.append(f"{relpath} ({'absent' if seen is None else f'{seen} bytes, reported {size}'})")
    if missing:
        raise DistributedSaveError(
            f"rank 0 does not see {len(missing)} file(s) rank {other} wrote into {staged.path}: "
            f"{', '.join(missing[:5])}. The root is not shared by every rank; use a shared filesystem or an "
            "object-store root (s3://...). Nothing was committed.",
            failed={other: "its files are not visible to rank 0"},
        )


# ---------------------------------------------------------------- export


def save_pretrained_collective(
    model: torch.nn.Module, out: str, *, timeout: float | None = None, **options: Any
) -> str:
    """`save_pretrained` under torchrun: the full state dict is gathered to rank 0's CPU, rank 0 writes."""
    from savepoint.integrations import deepspeed as ds

    inner: torch.nn.Module = model.module if ds.is_engine(model) else hf.unwrap_model(model)  # type: ignore[assignment]
    with distributed.peer_failures(f"save_pretrained to {out}", "gathering the weights to rank 0"):
        if ds.is_engine(model):
            full: dict[str, torch.Tensor] | None = ds.full_state(model)  # collective (ZeRO-3 gathers)
        else:
            full = distributed.full_model_state(inner) if is_sharded(inner) else None  # collective

    def write() -> str:
        staged = StagedDir(os.path.dirname(out), os.path.basename(out))
        try:
            state = savable(_hf_model(inner), full) if full is not None else None
            kind = hf.write_model_files(
                _hf_model(inner) if full is not None else inner, staged, state=state, **options
            )
            manifest = build_manifest("export" if kind == "model" else kind, staged.entries)
            return staged.commit(manifest.to_json(), replace=True)
        except BaseException:
            staged.abort()
            raise

    return distributed.on_rank0(write, timeout=timeout, what=f"save_pretrained to {out}")


# ---------------------------------------------------------------- restoring


def restore_collective(
    path: str,
    manifest: Manifest,
    *,
    model: torch.nn.Module,
    optimizer: Any = None,
    scheduler: Any = None,
    stateful: Mapping[str, Any] | None = None,
    timeout: float | None = None,
) -> Any:
    """Restore a checkpoint written at any world size into this rank (or a plain process).

    Checks first (files, keys, shapes; DCP tensors are read into fresh buffers), then changes state:
    stateful objects, the optimizer, the model (each rank keeps its shard), scheduler and RNG per rank.
    """
    from savepoint.integrations import deepspeed as ds
    from savepoint.restoring import apply_stateful, check_blobs, finish_restore

    if ds.is_engine(model):
        return ds.restore(
            path, manifest, engine=model, optimizer=optimizer, scheduler=scheduler, stateful=stateful
        )
    model = hf.unwrap_model(model)
    optimizer = unwrap_optimizer(optimizer) if optimizer is not None else None
    stateful = dict(stateful or {})
    _warn_world_size(path, manifest, stateful)
    # 1. What each rank can check alone: files, metadata, shapes, every blob. Then the ranks vote, so a
    # problem on one rank stops every rank before any of them enters a collective read.
    what = f"restore of {path}"
    error, blobs = None, {}
    model_step, optimizer_step = _ready(lambda: None), _ready(lambda: None)
    try:
        metadata = sharded.read_metadata(path, manifest) if sharded.has_dcp(manifest) else None
        model_step = _plan_model(model, path, manifest, metadata)
        blobs = _read_blobs(path, manifest, optimizer=optimizer, scheduler=scheduler, stateful=stateful)
        check_blobs(path, blobs, scheduler=scheduler, stateful=stateful)
        if optimizer is not None:
            optimizer_step = _plan_optimizer(model, optimizer, path, manifest, blobs, metadata)
    except BaseException as exc:
        error = exc
    try:
        agree(error, timeout=timeout, what=what)  # later collectives reuse this group (timeout=None)
    except DistributedSaveError as exc:
        if exc is error:
            raise
        lines = "; ".join(f"rank {r}: {m}" for r, m in sorted(exc.failed.items())) or str(exc)
        raise DistributedSaveError(
            f"{what} was refused, nothing was changed on any rank: {lines}", failed=exc.failed
        ) from exc
    # 2. Collective reads into fresh buffers (DCP raises on every rank); nothing live is changed yet:
    # the model's first, as the optimizer's step undoes its own initialisation when it fails.
    load_model = model_step.stage()
    load_optimizer = optimizer_step.stage()
    # 3. Everything is checked and read: from here on, state changes.
    apply_stateful(blobs, stateful)
    load_optimizer()  # before the model: it may hold views of the parameters
    load_model()
    return finish_restore(path, manifest, blobs, scheduler=scheduler, stateful={})


@dataclass(frozen=True)
class _Step:
    """One piece of a restore: `stage()` does its collective reads and returns the change to apply."""

    stage: Callable[[], Callable[[], object]]


def _ready(apply: Callable[[], object]) -> _Step:
    return _Step(stage=lambda: apply)


def _warn_world_size(path: str, manifest: Manifest, stateful: Mapping[str, Any]) -> None:
    now = distributed.world_size()
    if manifest.world_size == now or rank() != 0:
        return
    lost = (
        [f"RNG state of rank(s) {', '.join(map(str, range(now, manifest.world_size)))} is dropped"]
        if now < manifest.world_size
        else [
            f"ranks {manifest.world_size}..{now - 1} have no RNG state of their own and keep their current one"
        ]
    )
    if stateful and manifest.world_size > 1:
        lost.append(
            f"stateful objects ({', '.join(sorted(stateful))}) get their own rank's saved state where one "
            "exists, else rank 0's: data-loader positions do not match the new sharding of the data"
        )
    warnings.warn(
        f"{path} was saved by {manifest.world_size} rank(s) and is restored at {now}: model and optimizer state "
        f"are resharded exactly, but the continued run cannot be bit-identical: {'; '.join(lost)}",
        stacklevel=4,
    )


def _plan_model(model: torch.nn.Module, path: str, manifest: Manifest, metadata: Any) -> _Step:
    if manifest.kind == "adapter" or is_peft_model(model):
        from savepoint.lora.sharded import prime_fingerprint, uses_dtensor

        if (
            manifest.kind != "adapter"
            or not is_peft_model(model)
            or (is_sharded(model) and not uses_dtensor(model))
        ):
            raise IncompatibleCheckpointError(
                f"{path} holds a {'LoRA adapter' if manifest.kind == 'adapter' else 'full model'}: restore it into "
                f"{'a peft PeftModel (plain, DDP or FSDP2)' if manifest.kind == 'adapter' else 'a model that is no PeftModel'}"
            )
        from savepoint.formats import peft as peft_format

        def stage_adapter() -> Callable[[], object]:
            if is_sharded(model):  # collective: the full base's fingerprint, as a plain process computes it
                prime_fingerprint(model)
            # peft puts full adapter tensors into FSDP2's DTensor parameters itself (each rank its shard).
            return peft_format.plan_adapter_load(model, path, manifest)

        return _Step(stage=stage_adapter)
    if manifest.kind == "sharded":
        return _plan_model_from_dcp(model, path, manifest, metadata)
    if not is_sharded(model):
        files, targets = hf.check_model_files(model, path, manifest)
        return _ready(lambda: hf.copy_model_files(path, files, targets))
    files = hf.weight_files(path, manifest)
    verify_files(path, manifest, files)
    expected = _expected_shapes(model)
    layout, mismatches = hf.match_model_files(_hf_model(model), expected, hf.read_headers(path, files))
    if mismatches:
        raise IncompatibleCheckpointError(
            f"the model does not match checkpoint {path}; nothing was loaded:", mismatches=mismatches
        )
    return _ready(lambda: _load_full_files(model, path, files, layout))


def _plan_model_from_dcp(model: torch.nn.Module, path: str, manifest: Manifest, metadata: Any) -> _Step:
    """Check the stored shapes; the step reads this rank's shards into fresh buffers."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    stored = metadata.state_dict_metadata
    targets = sharded.model_tensors(model)
    problems = _shape_problems(stored, targets, "model")
    problems += [
        f"unexpected in checkpoint: {k}"
        for k in sorted(k for k in stored.keys() - targets.keys() if k.startswith(sharded.MODEL_PREFIX))
    ]
    if problems:
        raise IncompatibleCheckpointError(
            f"the model does not match checkpoint {path}; nothing was loaded:", mismatches=problems
        )

    def stage() -> Callable[[], object]:
        buffers = {k: torch.zeros_like(t) for k, t in targets.items()}  # a failed read changes no parameter
        sharded.read_dcp(path, manifest, buffers, metadata=metadata)  # collective
        prefix = len(sharded.MODEL_PREFIX)
        return lambda: set_model_state_dict(model, {k[prefix:]: v for k, v in buffers.items()})

    return _Step(stage=stage)


def _expected_shapes(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The savable names of a sharded model with their full shapes, as meta tensors."""
    meta = {
        n: torch.empty(tuple(t.shape), dtype=t.dtype, device="meta") for n, t in model.state_dict().items()
    }
    if hf.is_transformers_model(model):
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        return remove_tied_weights_from_state_dict(meta, model)  # type: ignore[arg-type]
    aliases = distributed.alias_names(model)
    return {n: t for n, t in meta.items() if n not in aliases}


def _load_full_files(model: torch.nn.Module, path: str, files: list[str], layout: Any = None) -> None:
    """Each rank reads the full weight files, one at a time (converted from the Hub's layout group by
    group where `layout` says so), and keeps its own shard of each tensor."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=True, strict=False)
    for part in hf.iter_model_parts(path, files, layout):
        set_model_state_dict(model, dict[str, Any](part), options=options)


def _read_blobs(
    path: str, manifest: Manifest, *, optimizer: Any, scheduler: Any, stateful: Mapping[str, Any]
) -> dict[str, Any]:
    from savepoint.saving import rng_relbase, stateful_relbase

    wanted: dict[str, str] = {}
    if optimizer is not None:
        wanted["optimizer"] = (
            sharded.GROUPS_BLOB if sharded.has_sharded_optimizer(manifest) else f"{_TS}/optimizer"
        )
    if scheduler is not None:
        wanted["scheduler"] = f"{_TS}/scheduler"
    for name in stateful:
        candidates = [
            per_rank_stateful_relbase(name, rank()),
            per_rank_stateful_relbase(name, 0),
            stateful_relbase(name),
        ]
        wanted[f"stateful/{name}"] = next(
            (c for c in candidates if train_state.has_blob(manifest, c)), candidates[-1]
        )
    missing = [
        f"{k} (no {rb}.json: it was saved without it)"
        for k, rb in wanted.items()
        if not train_state.has_blob(manifest, rb)
    ]
    if missing:
        raise IncompatibleCheckpointError(
            f"checkpoint {path} lacks state that restore() was asked for; pass only what was saved:",
            mismatches=missing,
        )
    for key, relbase in {"extra": f"{_TS}/extra", "rng": rng_relbase(rank())}.items():
        if train_state.has_blob(manifest, relbase):
            wanted[key] = relbase
    return {key: train_state.read_blob(path, manifest, relbase) for key, relbase in wanted.items()}


def _plan_optimizer(
    model: torch.nn.Module,
    optimizer: Any,
    path: str,
    manifest: Manifest,
    blobs: dict[str, Any],
    metadata: Any,
) -> _Step:
    """Check the saved optimizer state against `optimizer`; the step reads its DCP tensors. Nothing
    about `optimizer` is left changed when a check or the read fails."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    saved = blobs["optimizer"]
    if not sharded.has_sharded_optimizer(manifest):
        if not is_sharded(model):
            prepared = train_state.prepare_optimizer_state(optimizer, model, saved, path)
            return _ready(lambda: optimizer.load_state_dict(prepared))
        # Saved unsharded (name-keyed, full tensors): torch shards it into this rank's optimizer.
        _check_groups(model, optimizer, saved, path)
        _check_moments(model, saved.get("state"), path)
        options = StateDictOptions(full_state_dict=True)
        return _ready(lambda: set_optimizer_state_dict(model, optimizer, saved, options=options))
    _check_groups(model, optimizer, saved, path)
    stored = metadata.state_dict_metadata
    moments = {
        k[len(sharded.OPTIM_PREFIX) :]: list(m.size)
        for k, m in stored.items()
        if k.startswith(sharded.OPTIM_PREFIX)
    }
    by_param: dict[str, dict[str, Any]] = {}
    for key, size in moments.items():
        name, _, state_key = key.rpartition(".")
        by_param.setdefault(name, {})[state_key] = torch.empty(size, device="meta")
    _check_moments(model, by_param, path)
    _check_moments(model, saved.get("state"), path)  # the JSON rest: names only

    def stage() -> Callable[[], object]:
        was_empty = not optimizer.state
        try:
            template = sharded.optimizer_state(model, optimizer)  # initialises empty state (zero-lr step)
            tensors, _ = sharded.split_optimizer_state(template)
            problems = _shape_problems(stored, tensors, "optimizer")
            if problems:
                raise IncompatibleCheckpointError(
                    f"the optimizer does not match checkpoint {path}:", mismatches=problems
                )
            buffers = {k: torch.zeros_like(t) for k, t in tensors.items()}
            sharded.read_dcp(path, manifest, buffers, metadata=metadata)  # collective
        except BaseException:
            if was_empty:
                optimizer.state.clear()  # undo the initialisation: the optimizer is as it was given
            raise
        joined = sharded.join_optimizer_state(template, buffers, saved)
        return lambda: set_optimizer_state_dict(model, optimizer, joined)

    return _Step(stage=stage)


def _check_groups(model: torch.nn.Module, optimizer: Any, saved: Any, path: str) -> None:
    current = [sorted(n) for n in _group_names(optimizer, model)]
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(groups, list) or current != [
        sorted(g.get("params", [])) if isinstance(g, dict) else None for g in groups
    ]:
        raise IncompatibleCheckpointError(
            f"the optimizer's parameters differ from those saved in {path}; nothing was loaded. Build the "
            "optimizer over the same parameters, in the same groups, as the run that saved it."
        )


def _check_moments(model: torch.nn.Module, state: Any, path: str) -> None:
    """Optimizer moments against the parameters' full shapes (DTensor or plain). FSDP1 exposes only
    flat local shards, so there the check is left to torch's resharding of the loaded state."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        return
    shapes = {_clean_name(n): tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    train_state.check_optimizer_moments(state, shapes, path)


def _group_names(optimizer: Any, model: torch.nn.Module) -> list[list[str]]:
    # FSDP1 (and activation checkpointing) insert wrapper modules; torch's state dicts drop their names.
    names = {id(p): _clean_name(n) for n, p in model.named_parameters(remove_duplicate=False)}
    return [[names.get(id(p), "?") for p in g["params"]] for g in optimizer.param_groups]


def _clean_name(name: str) -> str:
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        name = name.replace(wrapper, "")
    return name


def _shape_problems(stored: Any, tensors: Mapping[str, torch.Tensor], what: str) -> list[str]:
    """What DCP metadata `stored` lacks of `tensors`, or holds in another shape."""
    problems = [f"missing in checkpoint: {k}" for k in sorted(tensors.keys() - stored.keys())]
    problems += [
        f"shape of {k}: checkpoint {list(stored[k].size)}, {what} {list(t.shape)}"
        for k, t in tensors.items()
        if k in stored and list(stored[k].size) != list(t.shape)
    ]
    return problems
