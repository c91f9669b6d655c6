"""Tiny TRL runs saving through `SavepointCallback`: a `DPOTrainer` with a synced reference model (TR-DPO),
run in-process or as a child to SIGKILL, and an `SFTTrainer` with LoRA.

    python trl_script.py ROOT OUT --max-steps 6 --die-at 5     # SIGKILLed after step 5

The reference model is mixed with the policy every 2 steps, so a resumed run only matches an
uninterrupted one if the reference model's weights come back from the checkpoint. The tokenizer
is trained locally, the models are tiny Llamas built from a config: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import signal
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig
from tests.helpers.models import make_tokenizer
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from savepoint.demo import tiny
from savepoint.integrations.transformers import SavepointCallback

SYNC_STEPS = 2
WORDS = tiny.load_corpus().split()[:64]  # words of the shipped corpus


def preferences(n: int) -> Dataset:
    """`n` prompts with a preferred and a rejected completion, made of corpus words (deterministic)."""
    g = torch.Generator().manual_seed(3)

    def words(k: int) -> str:
        return " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (k,), generator=g))

    rows = [{"prompt": words(4), "chosen": " " + words(3), "rejected": " " + words(3)} for _ in range(n)]
    return Dataset.from_list(rows)


class DieAt(TrainerCallback):
    """SIGKILL this process at the end of a step, after every other callback: a crash."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_log(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step and "loss" in kwargs.get("logs", {}):
            os.kill(os.getpid(), signal.SIGKILL)


def make_trainer(
    root: str, out: str, *, max_steps: int, die_at: int | None = None
) -> tuple[DPOTrainer, SavepointCallback]:
    torch.set_num_threads(1)
    tokenizer = make_tokenizer()
    args = DPOConfig(
        output_dir=out,
        max_steps=max_steps,
        per_device_train_batch_size=2,
        learning_rate=5e-3,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        sync_ref_model=True,
        ref_model_sync_steps=SYNC_STEPS,
        ref_model_mixup_alpha=0.5,
        max_length=32,
        seed=0,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    callback = SavepointCallback(root, keep_last=2)
    callbacks: list[TrainerCallback] = [callback] + ([DieAt(die_at)] if die_at is not None else [])
    trainer = DPOTrainer(
        model=tiny.tiny_llama(seed=0, vocab_size=len(tokenizer)),
        ref_model=tiny.tiny_llama(seed=0, vocab_size=len(tokenizer)),
        args=args,
        train_dataset=preferences(12),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    return trainer, callback


class StopAt(TrainerCallback):
    """Ends training cleanly after a step (the run then resumes in the same process)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            control.should_training_stop = True


def sft_trainer(root: str, *, stop_at: int | None = None) -> SFTTrainer:
    """A tiny `SFTTrainer` with a LoRA adapter (dropout on), saving every 3 steps, logging every 2."""
    torch.set_num_threads(1)
    words = tiny.load_corpus().split()
    texts = [" ".join(words[i * 12 : (i + 1) * 12]) for i in range(16)]
    args = SFTConfig(
        output_dir=f"{root}-out",
        max_steps=8,
        per_device_train_batch_size=2,
        learning_rate=5e-3,
        save_steps=3,
        logging_steps=2,
        max_length=32,
        seed=0,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
    )
    callbacks: list[TrainerCallback] = [SavepointCallback(root)] + ([StopAt(stop_at)] if stop_at else [])
    return SFTTrainer(
        model=tiny.tiny_llama(seed=0, attention_dropout=0.1),
        args=args,
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=make_tokenizer(),
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.1),
        callbacks=callbacks,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("out")
    parser.add_argument("--max-steps", type=int, default=6)
    parser.add_argument("--die-at", type=int)
    a = parser.parse_args()
    trainer, callback = make_trainer(a.root, a.out, max_steps=a.max_steps, die_at=a.die_at)
    trainer.train(resume_from_checkpoint=callback.resume_checkpoint())
