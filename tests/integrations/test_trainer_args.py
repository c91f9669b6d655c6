"""`SavepointCallback` honours the `TrainingArguments` a Trainer user already sets (retention, the
best metric, `load_best_model_at_end`, `resume_from_checkpoint=True`) when it was not given options
of its own, and records every save's logged values as metrics."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.integrations.trainer_script import Rows
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

import savepoint
from savepoint.demo import tiny
from savepoint.integrations.trainer_bridge import policy_from_args
from savepoint.integrations.transformers import SavepointCallback
from savepoint.policy import RetentionPolicy


def make_args(tmp_path: Path, **overrides: Any) -> TrainingArguments:
    base: dict[str, Any] = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=6,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=4,
        learning_rate=3e-3,
        save_strategy="steps",
        save_steps=2,
        logging_steps=5,  # not a save step: saves still record the step's loss
        seed=0,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
    )
    return TrainingArguments(**(base | overrides))


def make_trainer(args: TrainingArguments, *callbacks: TrainerCallback) -> Trainer:
    torch.set_num_threads(1)
    return Trainer(
        model=tiny.tiny_llama(seed=0).train(),
        args=args,
        train_dataset=Rows(12, seed=1),
        eval_dataset=Rows(4, seed=2),
        callbacks=list(callbacks),
    )


@pytest.mark.parametrize(
    ("given", "args", "expected"),
    [
        ({}, {}, {}),
        ({}, {"save_total_limit": 3}, {"keep_last": 3}),
        ({"keep_last": 1}, {"save_total_limit": 3}, {"keep_last": 1}),  # the callback's own rule wins
        ({"keep_every": 10}, {"save_total_limit": 3}, {"keep_every": 10}),
        ({}, {"metric_for_best_model": "loss"}, {"best_metric": "eval_loss", "best_mode": "min"}),
        (
            {},
            {"metric_for_best_model": "eval_accuracy"},
            {"best_metric": "eval_accuracy", "best_mode": "max"},
        ),
        (
            {},
            {"metric_for_best_model": "loss", "greater_is_better": True},
            {"best_metric": "eval_loss", "best_mode": "max"},
        ),
        ({"best_metric": "loss"}, {"metric_for_best_model": "accuracy"}, {"best_metric": "loss"}),
        (  # load_best_model_at_end alone means eval_loss, lower is better (TrainingArguments' default)
            {},
            {
                "load_best_model_at_end": True,
                "eval_strategy": "steps",
                "eval_steps": 2,
                "save_total_limit": 1,
            },
            {"best_metric": "eval_loss", "best_mode": "min", "keep_last": 1},
        ),
    ],
)
def test_policy_from_training_arguments(
    tmp_path: Path, given: dict[str, Any], args: dict[str, Any], expected: dict[str, Any]
) -> None:
    training_args = make_args(tmp_path, **args)
    ignored = bool(given) and bool(args) and given.keys() == expected.keys()  # args asked for what lost
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        policy = policy_from_args(RetentionPolicy(**given), training_args)
    assert policy == RetentionPolicy(**(given | expected))
    assert [str(w.message).split(" is ignored")[0] for w in caught] == (
        [next(f"{k}={v!r}" for k, v in args.items())] if ignored else []
    )


def test_saves_off_evaluation_steps_record_the_logged_values(tmp_path: Path) -> None:
    callback = SavepointCallback(tmp_path / "ckpt", best_metric="loss")
    trainer = make_trainer(make_args(tmp_path), callback)
    trainer.train()

    logged = {e["step"]: e for e in trainer.state.log_history if "loss" in e}
    infos = callback.manager.checkpoints
    assert [i.step for i in infos] == [2, 4, 6]
    for info in infos:
        for key in ("loss", "grad_norm", "learning_rate"):
            assert info.metrics[key] == logged[info.step][key], (info.step, key)
    best = min(infos, key=lambda i: i.metrics["loss"])
    assert callback.manager.best_step == best.step


def test_training_arguments_drive_retention_best_and_load_best_model_at_end(tmp_path: Path) -> None:
    # greater_is_better=True on the eval loss makes an early evaluation the best (step 4 in this
    # deterministic run): a checkpoint that retention must keep and load_best_model_at_end must load.
    args = make_args(
        tmp_path,
        max_steps=8,
        eval_strategy="steps",
        eval_steps=2,
        save_total_limit=2,
        metric_for_best_model="loss",
        greater_is_better=True,
        load_best_model_at_end=True,
    )
    callback = SavepointCallback(tmp_path / "ckpt")
    rng: list[torch.Tensor] = []
    trainer = make_trainer(args, RngBeforeTrainEnd(rng), callback, RngAfterTrainEnd(rng))
    trainer.train()
    assert torch.equal(rng[0], rng[1]), "loading the best model changed the global RNG"

    mgr = callback.manager
    assert (mgr.policy.keep_last, mgr.policy.best_metric, mgr.policy.best_mode) == (2, "eval_loss", "max")
    losses = {i.step: i.metrics["eval_loss"] for i in mgr.checkpoints}
    best = max(losses, key=losses.__getitem__)
    assert best < 6 and sorted(losses) == [best, 6, 8]  # the 2 newest, and the best on top
    assert mgr.best_step == best
    best_path = mgr.checkpoints[0].path
    assert trainer.state.best_model_checkpoint == best_path

    expected = AutoModelForCausalLM.from_pretrained(best_path).state_dict()
    final = AutoModelForCausalLM.from_pretrained(mgr.checkpoints[-1].path).state_dict()
    ours = trainer.model.state_dict()
    assert all(torch.equal(ours[k], expected[k]) for k in expected)
    assert not all(torch.equal(ours[k], final[k]) for k in final)
    savepoint.verify(tmp_path / "ckpt")


class RngBeforeTrainEnd(TrainerCallback):
    def __init__(self, out: list[torch.Tensor]) -> None:
        self.out = out

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.out.append(torch.random.get_rng_state())


class RngAfterTrainEnd(RngBeforeTrainEnd):
    pass


def test_resume_from_checkpoint_true_on_an_empty_root_names_the_fix(tmp_path: Path) -> None:
    callback = SavepointCallback(tmp_path / "ckpt")
    trainer = make_trainer(make_args(tmp_path), callback)
    with pytest.raises(savepoint.CheckpointNotFoundError, match=r"callback\.resume_checkpoint\(\)"):
        trainer.train(resume_from_checkpoint=True)


def test_one_callback_serves_a_second_trainer_resuming_in_the_same_process(tmp_path: Path) -> None:
    callback = SavepointCallback(tmp_path / "ckpt")
    make_trainer(make_args(tmp_path, max_steps=4), callback).train()
    resumed = make_trainer(make_args(tmp_path, max_steps=6), callback)  # the root was released at train end
    resumed.train(resume_from_checkpoint=True)
    assert [i.step for i in callback.manager.checkpoints] == [2, 4, 6]
    assert resumed.state.log_history[0]["step"] == 2  # the history up to step 4 came from the checkpoint
