"""A tiny HF `Trainer` run that saves through `SavepointCallback`; run in-process or as a child to kill.

    python trainer_script.py ROOT OUT --max-steps 10 --die-at 8     # SIGKILLed after step 8

12 training rows, batch 2: 6 steps per epoch, so a 10-step run crosses an epoch boundary. Dropout
is on, so a resumed run only matches if the RNG states come back at the right moment.
"""

from __future__ import annotations

import argparse
import os
import signal
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from savepoint.demo import tiny
from savepoint.integrations.transformers import SavepointCallback

SEQ_LEN = 16


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        ids = torch.randint(
            3, tiny.DEFAULT_VOCAB_SIZE, (n, SEQ_LEN), generator=torch.Generator().manual_seed(seed)
        )
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Curriculum:
    """State the Trainer does not own, changed every step: a `stateful=` object of the callback."""

    def __init__(self) -> None:
        self.steps_seen: list[int] = []

    def state_dict(self) -> dict[str, Any]:
        return {"steps_seen": list(self.steps_seen)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_seen = list(state["steps_seen"])


class Advance(TrainerCallback):
    """Moves the curriculum and the callback's `extra=` values on at the end of every step."""

    def __init__(self, curriculum: Curriculum, extra: dict[str, Any]) -> None:
        self.curriculum, self.extra = curriculum, extra

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.curriculum.steps_seen.append(state.global_step)
        self.extra["difficulty"] = self.extra.get("difficulty", 0) + state.global_step


class DieAt(TrainerCallback):
    """SIGKILL this process at the end of a step: a crash, with no chance to clean up."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def make_trainer(
    root: str, out: str, *, max_steps: int, die_at: int | None = None, **manager: Any
) -> tuple[Trainer, SavepointCallback]:
    torch.set_num_threads(1)
    model = tiny.tiny_llama(seed=0, attention_dropout=0.2).train()
    args = TrainingArguments(
        output_dir=out,
        max_steps=max_steps,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=4,
        learning_rate=3e-3,
        lr_scheduler_type="cosine",
        warmup_steps=2,
        eval_strategy="steps",
        eval_steps=3,
        save_strategy="steps",
        save_steps=3,
        logging_steps=1,
        seed=0,
        use_cpu=True,
        report_to=[],
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    curriculum, extra = Curriculum(), {"difficulty": 0}
    callback = SavepointCallback(
        root,
        stateful={"curriculum": curriculum},
        extra=extra,
        **({"keep_last": 2, "best_metric": "eval_loss", "keep_best": 1} | manager),
    )
    callbacks: list[TrainerCallback] = [callback, Advance(curriculum, extra)]
    callbacks += [DieAt(die_at)] if die_at is not None else []
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Rows(12, seed=1),
        eval_dataset=Rows(4, seed=2),
        callbacks=callbacks,
    )
    return trainer, callback


def train(root: str, out: str, *, max_steps: int, die_at: int | None = None, **manager: Any) -> Trainer:
    trainer, callback = make_trainer(root, out, max_steps=max_steps, die_at=die_at, **manager)
    trainer.train(resume_from_checkpoint=callback.resume_checkpoint())
    return trainer


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("out")
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--die-at", type=int)
    a = parser.parse_args()
    train(a.root, a.out, max_steps=a.max_steps, die_at=a.die_at)
