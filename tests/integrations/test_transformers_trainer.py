"""A real HF `Trainer` saving through `SavepointCallback`, SIGKILLed and resumed, ends bit-identical
to the run that was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.integrations import trainer_script
from transformers import AutoModelForCausalLM

import savepoint
from savepoint.integrations.transformers import SavepointCallback

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS = 10


def train_losses(trainer) -> dict[int, float]:  # type: ignore[no-untyped-def]
    return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("trainer-ref")
    trainer = trainer_script.train(str(tmp / "ckpt"), str(tmp / "out"), max_steps=MAX_STEPS)
    return tmp / "ckpt", trainer


def test_uninterrupted_run_saves_through_savepoint(reference) -> None:  # type: ignore[no-untyped-def]
    root, trainer = reference
    mgr = savepoint.CheckpointManager(root, best_metric="eval_loss")
    steps = [i.step for i in mgr.checkpoints]
    assert steps[-2:] == [9, 10] and mgr.best_step in steps  # keep_last=2, and the best is never deleted
    assert all("eval_loss" in i.metrics for i in mgr.checkpoints if i.step % 3 == 0)
    logged = {e["step"]: e for e in trainer.state.log_history if "loss" in e}
    for info in mgr.checkpoints:  # what the Trainer logged at the step, eval step or not
        assert {k: info.metrics[k] for k in ("loss", "grad_norm", "learning_rate")} == {
            k: logged[info.step][k] for k in ("loss", "grad_norm", "learning_rate")
        }
    assert not any(p.name.startswith("checkpoint-") for p in Path(trainer.args.output_dir).glob("*"))
    savepoint.verify(root)
    final = root / "step-00000010"
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["global_step"] == MAX_STEPS
    reloaded = AutoModelForCausalLM.from_pretrained(final)  # a plain transformers model directory
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


@pytest.mark.parametrize(
    ("die_at", "resumed_from", "resume_with"),
    # mid-epoch; and exactly at the end of epoch 1 (6 steps per epoch), with train(resume_from_checkpoint=True)
    [(5, 3, "resume_checkpoint"), (8, 6, True)],
)
def test_killed_and_resumed_trainer_matches_uninterrupted(
    tmp_path: Path, reference, die_at: int, resumed_from: int, resume_with: object
) -> None:  # type: ignore[no-untyped-def]
    _, ref = reference
    root, out = tmp_path / "ckpt", tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'src'}{os.pathsep}{REPO}", PYTHONWARNINGS="ignore")
    script = Path(trainer_script.__file__)
    killed = subprocess.run(
        [
            sys.executable,
            str(script),
            str(root),
            str(out),
            "--max-steps",
            str(MAX_STEPS),
            "--die-at",
            str(die_at),
        ],
        env=env,
        capture_output=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-3000:]
    assert savepoint.CheckpointManager(root).latest_step == resumed_from

    trainer, callback = trainer_script.make_trainer(str(root), str(out), max_steps=MAX_STEPS)
    resume = callback.resume_checkpoint()
    assert resume is not None and resume.endswith(f"step-{resumed_from:08d}")
    trainer.train(resume_from_checkpoint=resume if resume_with == "resume_checkpoint" else resume_with)

    # The resumed log history holds steps up to the checkpoint (from trainer_state.json), then its own.
    ours, theirs = train_losses(trainer), train_losses(ref)
    assert sorted(ours) == list(range(1, MAX_STEPS + 1))
    assert ours == theirs, "the loss curve diverged after resume"
    for name, tensor in ref.model.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[name], tensor), (
            f"{name} differs from the uninterrupted run"
        )
    # The callback's stateful= object and extra= values came back, and went on as in the uninterrupted run.
    assert callback.stateful["curriculum"].steps_seen == list(range(1, MAX_STEPS + 1))
    (uninterrupted,) = [c for c in ref.callback_handler.callbacks if isinstance(c, SavepointCallback)]
    assert callback.extra == uninterrupted.extra == {"difficulty": sum(range(MAX_STEPS + 1))}
    mine = load_file(root / "step-00000010" / "train_state" / "optimizer.safetensors")
    reference_opt = load_file(reference[0] / "step-00000010" / "train_state" / "optimizer.safetensors")
    assert mine.keys() == reference_opt.keys() and all(torch.equal(mine[k], reference_opt[k]) for k in mine)
