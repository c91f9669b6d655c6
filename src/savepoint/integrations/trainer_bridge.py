"""What `SavepointCallback` (integrations/transformers.py) takes from a Hugging Face `Trainer` and hands
back to it: the step's logged metrics, retention options from `TrainingArguments`, the trainer running
a hook, and `trainer_state.json` written next to the tokenizer.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import warnings
from typing import Any

from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments

from savepoint.policy import RetentionPolicy

TRAINER_STATE_NAME = "trainer_state.json"


class TokenizerAndTrainerState:
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
    return json.dumps(dataclasses.asdict(state), indent=2, sort_keys=True) + "\n"


def step_metrics(state: TrainerState) -> dict[str, float]:
    """Every finite number the Trainer logged at the current step (train loss, learning rate, eval_*).

    The end-of-training summary (`train_runtime`, `train_loss` over the whole run...) is no metric
    of the step, though it is logged at the last one.
    """
    out: dict[str, float] = {}
    for entry in state.log_history:
        if entry.get("step") != state.global_step or "train_runtime" in entry:
            continue
        for key, value in entry.items():
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if key not in ("step", "epoch") and number and math.isfinite(value):
                out[key] = float(value)
    return out


def policy_from_args(current: RetentionPolicy, args: TrainingArguments) -> RetentionPolicy:
    """The retention policy with what `args` says filled in where the callback was given nothing.

    `save_total_limit` becomes `keep_last` when no retention rule was given; `metric_for_best_model`
    (prefixed `eval_` as the Trainer does) and `greater_is_better` become `best_metric` and
    `best_mode` when no `best_metric` was given. Options given to the callback win, with a warning
    where `args` asked for something else.
    """
    changes: dict[str, Any] = {}
    limit = args.save_total_limit
    if limit is not None and limit > 0:
        if current.keeps_everything:
            changes["keep_last"] = limit
        elif current.keep_last != limit:
            warnings.warn(
                f"save_total_limit={limit} is ignored: SavepointCallback has its own retention policy ({current})",
                stacklevel=3,
            )
    name = args.metric_for_best_model
    if name:
        metric = name if name.startswith("eval_") else f"eval_{name}"
        mode = "max" if args.greater_is_better else "min"
        if current.best_metric is None:
            changes.update(best_metric=metric, best_mode=mode)
        elif (current.best_metric, current.best_mode) != (metric, mode):
            warnings.warn(
                f"metric_for_best_model={name!r} is ignored: SavepointCallback ranks checkpoints by "
                f"{current.best_metric!r} ({current.best_mode})",
                stacklevel=3,
            )
    return dataclasses.replace(current, **changes)


def calling_trainer(callback: TrainerCallback) -> Trainer | None:
    """The `Trainer` whose method is running `callback`'s hook right now, or None.

    The callback API hands a hook the model and the optimizer, not the trainer; the trainer is
    needed to honour `train(resume_from_checkpoint=True)` and to reach TRL's reference model. Hooks
    are called from the trainer's own methods (`__init__`, `train`), so it is a caller's `self`.
    """
    frame = inspect.currentframe()
    try:
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Trainer) and callback in candidate.callback_handler.callbacks:
                return candidate
            frame = frame.f_back
        return None
    finally:
        del frame  # frames hold references to their locals: do not keep the chain alive
