"""`SavepointCallback`: a Hugging Face `Trainer` that saves through savepoint and resumes exactly.

    cb = SavepointCallback("runs/exp1", keep_last=2, best_metric="eval_loss", keep_best=1)
    trainer = Trainer(model=model, args=args, train_dataset=ds, eval_dataset=ev, callbacks=[cb])
    trainer.train(resume_from_checkpoint=cb.resume_checkpoint())   # None on the first run
    trainer.train(resume_from_checkpoint=True)                      # the same, or an error if none

The Trainer still decides *when* to save (`save_strategy`, `save_steps`; or the manager's
`save_every`); the callback takes the save over and stops the Trainer from writing its own
`checkpoint-N` (pickled optimizer and RNG). A checkpoint holds the model, the tokenizer, the
optimizer, the LR scheduler, the RNG states, `trainer_state.json` (JSON: it is what the Trainer
reads to skip the batches already seen), the callback's `stateful=` objects and `extra=` values,
and for TRL trainers the state TRL keeps outside the Trainer (`savepoint.integrations.trl`), all
checksummed in the manifest. A save waits until the Trainer has logged the step (a save step is
always a logging step) and, when an evaluation is due at the same step, for its metrics: the
checkpoint's metrics are what the Trainer logged at that step (`loss`, `grad_norm`,
`learning_rate`, `eval_*`), so `best_metric` can rank checkpoints and retention never deletes the
best one.

`TrainingArguments` the callback honours when it was not given its own options:
`save_total_limit` (as `keep_last`; the best checkpoint is kept on top, as the Trainer does),
`metric_for_best_model` and `greater_is_better` (as `best_metric`, `eval_`-prefixed like the
Trainer, and `best_mode`), and `load_best_model_at_end` (the manager loads the best checkpoint's
weights into the model when training ends, verified).

Resuming uses the Trainer's own machinery: `resume_checkpoint()` picks the newest intact checkpoint
(a damaged one is skipped with a warning) and hands its directory to `train()`, which reads
`trainer_state.json` and fast-forwards the data. On `on_train_begin` the callback then loads the
model, optimizer, scheduler and stateful objects through savepoint (checksums first), and puts the
RNG states back at the moment the Trainer itself would (after the resumed epoch's data iterator is
created).

Not supported: `save_strategy="best"`, DeepSpeed/FSDP state, and multi-process Trainer runs (they
need savepoint's distributed saving).
"""

from __future__ import annotations

import functools
import os
import tempfile
import warnings
import weakref
from collections.abc import Mapping
from typing import Any

from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from savepoint import policy
from savepoint.discovery import step_dir_name
from savepoint.errors import CheckpointNotFoundError, CorruptCheckpointError, SavepointError
from savepoint.formats import train_state
from savepoint.formats.rank_state import stateful_relbase
from savepoint.formats.train_state import rng_state, set_rng_state
from savepoint.integrations import trl as trl_integration
from savepoint.integrations.trainer_bridge import (
    TokenizerAndTrainerState,
    calling_trainer,
    policy_from_args,
    step_metrics,
)
from savepoint.integrations.trainer_files import resume_problems
from savepoint.manager import CheckpointManager
from savepoint.manifest import read_manifest
from savepoint.storage.remote import RemoteRoot, is_remote_url


class SavepointCallback(TrainerCallback):
    """Makes a `Trainer` save through savepoint and resume exactly from savepoint checkpoints.

    Args:
        root: a `CheckpointManager`, or the root (path or fsspec URL) to build one for.
        stateful: objects with `state_dict()` / `load_state_dict()` that the Trainer does not own
            (a curriculum, a data mixer, a KL controller): saved with every checkpoint, restored on
            resume before training continues.
        extra: a dict of JSON values saved with every checkpoint (read at each save, so update it as
            training goes); on resume it is updated in place with the checkpoint's values.
        **manager_options: `CheckpointManager` options (`keep_last`, `best_metric`, `keep_best`,
            `save_every`, `async_save`, ...), when `root` is not a manager already.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | CheckpointManager,
        *,
        stateful: Mapping[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        **manager_options: Any,
    ) -> None:
        if isinstance(root, CheckpointManager):
            if manager_options:
                raise TypeError("pass manager options to the CheckpointManager, not next to it")
            self.manager = root
        else:
            self.manager = CheckpointManager(root, **manager_options)
        self.stateful = dict(stateful or {})
        self.extra = extra if extra is not None else {}
        reserved = set(self.stateful) & {trl_integration.REF_MODEL, trl_integration.NUM_TOKENS}
        if reserved:
            raise ValueError(f"stateful names {sorted(reserved)} are reserved for TRL's state; rename yours")
        self._pending_step: int | None = None  # a save waiting for this step's log or evaluation
        self._awaits_evaluation = False
        self._rng: dict[str, Any] | None = None  # RNG states to put back once the data iterator exists
        self._download: tempfile.TemporaryDirectory[str] | None = None
        self._saved_step: int | None = None
        self._trainer: weakref.ref[Trainer] | None = None

    # ------------------------------------------------------------ resuming

    def resume_checkpoint(self) -> str | None:
        """The newest intact checkpoint, as a local directory for `trainer.train(resume_from_checkpoint=...)`.

        None when the root holds no checkpoint (a fresh run). Remote roots are downloaded to a
        temporary directory that lives until training ends.
        """
        for info in reversed(self.manager.checkpoints):
            local = self._local(info.path)
            problems = resume_problems(local)  # before the Trainer opens any file there
            if not problems:
                return local
            warnings.warn(
                str(CorruptCheckpointError(info.path, problems, hint="trying the previous one")), stacklevel=2
            )
        return None

    def _local(self, path: str) -> str:
        if not is_remote_url(path):
            return path
        if self._download is None:
            self._download = tempfile.TemporaryDirectory(prefix="savepoint-trainer-")
        return RemoteRoot(self.manager.root).download(path, self._download.name)

    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if str(args.save_strategy).rsplit(".", 1)[-1].lower() == "best":
            raise SavepointError(
                'save_strategy="best" is not supported by SavepointCallback: use save_strategy="steps" with '
                "CheckpointManager(best_metric=..., keep_best=1); the best checkpoint is never deleted"
            )
        self.manager.policy = policy_from_args(self.manager.policy, args)
        trainer = calling_trainer(self)
        if trainer is not None:
            self._bind(trainer)

    def _bind(self, trainer: Trainer) -> None:
        """Remember `trainer`, and make its `train(resume_from_checkpoint=True)` resume from this root."""
        self._trainer = weakref.ref(trainer)
        if getattr(trainer.train, "savepoint_callback", None) is not None:
            return
        train = trainer.train
        callback_ref = weakref.ref(self)

        @functools.wraps(train)
        def train_resuming_from_savepoint(
            resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any
        ) -> Any:
            callback = callback_ref()
            if resume_from_checkpoint is True and callback is not None:
                resume_from_checkpoint = callback.resume_checkpoint()
                if resume_from_checkpoint is None:
                    raise CheckpointNotFoundError(
                        f"train(resume_from_checkpoint=True): {callback.manager.root} holds no intact savepoint "
                        "checkpoint; pass resume_from_checkpoint=callback.resume_checkpoint(), which is None "
                        "on a fresh run"
                    )
            return train(resume_from_checkpoint, *args, **kwargs)

        train_resuming_from_savepoint.savepoint_callback = callback_ref  # type: ignore[attr-defined]
        trainer.train = train_resuming_from_savepoint  # type: ignore[method-assign]

    def _stateful(self) -> dict[str, Any]:
        trainer = self._trainer() if self._trainer is not None else None
        return {**self.stateful, **(trl_integration.trainer_state(trainer) if trainer is not None else {})}

    def _stateful_saved_at(self, step: int) -> dict[str, Any]:
        """`_stateful()`, less the TRL state a checkpoint written before savepoint saved it lacks
        (with a warning); the user's own `stateful=` objects stay required."""
        stateful = self._stateful()
        added = [n for n in trl_integration.STATE_NAMES if n in stateful and n not in self.stateful]
        if not added or is_remote_url(self.manager.root):
            return stateful
        try:
            saved = read_manifest(os.path.join(self.manager.root, step_dir_name(step)))
        except SavepointError:
            return stateful  # the restore reports what is wrong with it
        lacking = [n for n in added if not train_state.has_blob(saved, stateful_relbase(n))]
        if lacking:
            warnings.warn(
                f"checkpoint step {step} has no {', '.join(lacking)} (it predates savepoint's TRL support): "
                "the resumed run starts those from the trainer's current values and is not exact",
                stacklevel=2,
            )
        return {k: v for k, v in stateful.items() if k not in lacking}

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._trainer is None:  # added with trainer.add_callback(), after on_init_end
            trainer = calling_trainer(self)
            self._trainer = weakref.ref(trainer) if trainer is not None else None
        # A callback may serve several train() calls (a second Trainer resuming this root, say).
        self._pending_step, self._awaits_evaluation, self._saved_step = None, False, None
        if state.global_step == 0:
            return
        # The Trainer read trainer_state.json from the checkpoint; load everything else, verified.
        result = self.manager.restore(
            model=kwargs["model"],
            optimizer=kwargs.get("optimizer"),
            scheduler=kwargs.get("lr_scheduler"),
            stateful=self._stateful_saved_at(state.global_step),
            step=state.global_step,
        )
        if result.extra:  # saved only when it held something: otherwise keep the values given
            self.extra.clear()
            self.extra.update(result.extra)
        self._rng = rng_state()

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._flush(state, kwargs)  # a save at the end of the last epoch that nothing logged after
        # Resumed at an epoch boundary: the Trainer sets RNG before the epoch's iterator draws from it.
        if self._rng is not None and float(state.epoch or 0).is_integer():
            self._restore_rng()

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._flush(state, kwargs)
        # Resumed mid-epoch: the iterator was created (and drew from the RNG) while skipping batches.
        if self._rng is not None:
            self._restore_rng()

    def _restore_rng(self) -> None:
        assert self._rng is not None
        set_rng_state(self._rng)
        self._rng = None

    # ------------------------------------------------------------ saving

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        due = control.should_save or policy.should_save(state.global_step, self.manager.save_every)
        self._take_over_save(due, state, control)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._take_over_save(control.should_save, state, control)

    def _take_over_save(self, due: bool, state: TrainerState, control: TrainerControl) -> None:
        """Stop the Trainer's own save, and save once the step is logged (and evaluated, if due).

        Saving later than `on_step_end` also lets every other callback's `on_step_end` run first
        (TRL syncs its reference model there). The Trainer logs nothing it did not compute, so a
        forced log only adds a line with the step's loss, gradient norm and learning rate.
        """
        control.should_save = False  # savepoint writes the checkpoint; the Trainer must not
        if not due or self._saved_step == state.global_step:
            return
        self._pending_step = state.global_step
        self._awaits_evaluation = control.should_evaluate
        control.should_log = True

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # The step's training log (not an evaluation's, nor the end-of-training summary)
        if not self._awaits_evaluation and "loss" in (kwargs.get("logs") or {}):
            self._flush(state, kwargs)

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._flush(state, kwargs)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._flush(state, kwargs)
        self.manager.close()  # durable, and the root released: a new Trainer in this process may resume it
        if args.load_best_model_at_end:
            self._load_best(state, kwargs["model"])
        if self._download is not None:
            self._download.cleanup()
            self._download = None

    def _flush(self, state: TrainerState, kwargs: dict[str, Any]) -> None:
        if self._pending_step is not None and self._pending_step == state.global_step:
            self._save(state, kwargs)

    def _save(self, state: TrainerState, kwargs: dict[str, Any]) -> None:
        self._pending_step = None
        self._awaits_evaluation = False
        self._saved_step = state.global_step
        self.manager.save(
            state.global_step,
            model=kwargs["model"],
            optimizer=kwargs.get("optimizer"),
            scheduler=kwargs.get("lr_scheduler"),
            tokenizer=TokenizerAndTrainerState(kwargs.get("processing_class"), state),
            stateful=self._stateful(),
            metrics=step_metrics(state),
            extra=self.extra,
        )

    def _load_best(self, state: TrainerState, model: Any) -> None:
        """`load_best_model_at_end`: the best checkpoint's weights, verified; the RNG states are left as they are."""
        if self.manager.best_step is None:
            warnings.warn(
                f"load_best_model_at_end: no checkpoint in {self.manager.root} has the metric "
                f"{self.manager.policy.best_metric!r}; the model keeps its final weights",
                stacklevel=3,
            )
            return
        rng = rng_state()
        result = self.manager.restore(model=model, step="best")
        set_rng_state(rng)
        state.best_model_checkpoint = result.path
