"""`SavepointCallback`: a Hugging Face `Trainer` that saves through savepoint and resumes exactly.

    cb = SavepointCallback("runs/exp1", keep_last=2, best_metric="eval_loss", keep_best=1)
    trainer = Trainer(model=model, args=args, train_dataset=ds, eval_dataset=ev, callbacks=[cb])
    trainer.train(resume_from_checkpoint=cb.resume_checkpoint())   # None on the first run

The Trainer still decides *when* to save (`save_strategy`, `save_steps`; or the manager's
`save_every`); the callback takes the save over and stops the Trainer from writing its own
`checkpoint-N` (pickled optimizer and RNG). A checkpoint holds the model, the tokenizer, the
optimizer, the LR scheduler, the RNG states and `trainer_state.json` (JSON: it is what the Trainer
reads to skip the batches already seen), all checksummed in the manifest. When an evaluation is due
at the same step, the save waits for its metrics, so `best_metric="eval_loss"` ranks checkpoints and
retention never deletes the best one.

Resuming uses the Trainer's own machinery: `resume_checkpoint()` picks the newest intact checkpoint
(a damaged one is skipped with a warning) and hands its directory to `train()`, which reads
`trainer_state.json` and fast-forwards the data. On `on_train_begin` the callback then loads the
model, optimizer and scheduler through savepoint (checksums first), and puts the RNG states back at
the moment the Trainer itself would (after the resumed epoch's data iterator is created).

Not supported: `save_strategy="best"` and `load_best_model_at_end` (use `best_metric`/`keep_best`
and `manager.restore(step="best")`), DeepSpeed/FSDP state, and multi-process Trainer runs (they need
savepoint's distributed saving).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from savepoint import policy
from savepoint.errors import CorruptCheckpointError, SavepointError
from savepoint.formats.train_state import rng_state, set_rng_state
from savepoint.integrations.trainer_files import resume_problems
from savepoint.manager import CheckpointManager
from savepoint.storage.remote import RemoteRoot, is_remote_url

TRAINER_STATE_NAME = "trainer_state.json"


class _TokenizerAndTrainerState:
    """Passed as the checkpoint's `tokenizer`: writes the tokenizer (if any) and `trainer_state.json`.

    The Trainer state is serialized when the save is requested, so an async save writes the state
    of its own step, not of a later one.
    """

    def __init__(self, tokenizer: Any, state: TrainerState) -> None:
        self.tokenizer = tokenizer
        self.state_json = state.to_json_string() if hasattr(state, "to_json_string") else _state_json(state)

    def save_pretrained(self, path: str) -> None:
        if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(path)
        with open(os.path.join(path, TRAINER_STATE_NAME), "w", encoding="utf-8") as f:
            f.write(self.state_json)


def _state_json(state: TrainerState) -> str:
    import dataclasses

    return json.dumps(dataclasses.asdict(state), indent=2, sort_keys=True) + "\n"


def step_metrics(state: TrainerState) -> dict[str, float]:
    """Every finite number the Trainer logged at the current step (train loss, learning rate, eval_*)."""
    out: dict[str, float] = {}
    for entry in state.log_history:
        if entry.get("step") != state.global_step:
            continue
        for key, value in entry.items():
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if key not in ("step", "epoch") and number and math.isfinite(value):
                out[key] = float(value)
    return out


class SavepointCallback(TrainerCallback):
    """Makes a `Trainer` save through savepoint and resume exactly from savepoint checkpoints.

    Args:
        root: a `CheckpointManager`, or the root (path or fsspec URL) to build one for.
        **manager_options: `CheckpointManager` options (`keep_last`, `best_metric`, `keep_best`,
            `save_every`, `async_save`, ...), when `root` is not a manager already.
    """

    def __init__(self, root: str | os.PathLike[str] | CheckpointManager, **manager_options: Any) -> None:
        if isinstance(root, CheckpointManager):
            if manager_options:
                raise TypeError("pass manager options to the CheckpointManager, not next to it")
            self.manager = root
        else:
            self.manager = CheckpointManager(root, **manager_options)
        self._pending_step: int | None = None  # a save waiting for this step's evaluation
        self._rng: dict[str, Any] | None = None  # RNG states to put back once the data iterator exists
        self._download: tempfile.TemporaryDirectory[str] | None = None
        self._saved_step: int | None = None

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
        if args.load_best_model_at_end:
            raise SavepointError(
                "load_best_model_at_end is not supported by SavepointCallback (the Trainer writes no checkpoint-N "
                'of its own); after training, use callback.manager.restore(model=model, step="best")'
            )

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.global_step == 0:
            return
        # The Trainer read trainer_state.json from the checkpoint; load everything else, verified.
        self.manager.restore(
            model=kwargs["model"],
            optimizer=kwargs.get("optimizer"),
            scheduler=kwargs.get("lr_scheduler"),
            step=state.global_step,
        )
        self._rng = rng_state()

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # Resumed at an epoch boundary: the Trainer sets RNG before the epoch's iterator draws from it.
        if self._rng is not None and float(state.epoch or 0).is_integer():
            self._restore_rng()

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
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
        self._take_over_save(due, state, control, kwargs)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._take_over_save(control.should_save, state, control, kwargs)

    def _take_over_save(
        self, due: bool, state: TrainerState, control: TrainerControl, kwargs: dict[str, Any]
    ) -> None:
        control.should_save = False  # savepoint writes the checkpoint; the Trainer must not
        if not due or self._saved_step == state.global_step:
            return
        if control.should_evaluate:
            self._pending_step = state.global_step  # save once the metrics exist (on_evaluate)
        else:
            self._save(state, kwargs)

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._pending_step == state.global_step:
            self._save(state, kwargs)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._pending_step == state.global_step:  # an evaluation that never came
            self._save(state, kwargs)
        self.manager.wait()
        if self._download is not None:
            self._download.cleanup()
            self._download = None

    def _save(self, state: TrainerState, kwargs: dict[str, Any]) -> None:
        self._pending_step = None
        self._saved_step = state.global_step
        self.manager.save(
            state.global_step,
            model=kwargs["model"],
            optimizer=kwargs.get("optimizer"),
            scheduler=kwargs.get("lr_scheduler"),
            tokenizer=_TokenizerAndTrainerState(kwargs.get("processing_class"), state),
            metrics=step_metrics(state),
        )
