"""TRL trainers resume exactly through `SavepointCallback`: a `DPOTrainer` with a synced reference model
(TR-DPO), SIGKILLed and resumed, logs what the uninterrupted run logs at every step (loss, rewards,
TRL's `num_tokens`) and ends with the same policy and reference weights; an `SFTTrainer` with LoRA
keeps its losses, token count and adapter weights across a resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from tests.integrations import trl_script

import savepoint
from savepoint.integrations import trl as trl_integration

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS = 6


def logged(trainer) -> dict[int, dict[str, float]]:  # type: ignore[no-untyped-def]
    return {e["step"]: e for e in trainer.state.log_history if "loss" in e}


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("dpo-ref")
    trainer, _ = trl_script.make_trainer(str(tmp / "ckpt"), str(tmp / "out"), max_steps=MAX_STEPS)
    initial_ref = weights(trainer.ref_model)
    trainer.train()
    assert any(not torch.equal(initial_ref[k], v) for k, v in weights(trainer.ref_model).items()), (
        "the reference model was never synced: the test would prove nothing"
    )
    return trainer


def test_dpo_with_synced_reference_model_resumes_exactly(tmp_path: Path, reference) -> None:  # type: ignore[no-untyped-def]
    root, out = tmp_path / "ckpt", tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'src'}{os.pathsep}{REPO}", PYTHONWARNINGS="ignore")
    killed = subprocess.run(
        [
            sys.executable,
            trl_script.__file__,
            str(root),
            str(out),
            "--max-steps",
            str(MAX_STEPS),
            "--die-at",
            "5",
        ],
        env=env,
        capture_output=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-3000:]
    mgr = savepoint.CheckpointManager(root)
    assert mgr.latest_step == 4
    saved = savepoint.CheckpointManager(root).checkpoints[-1].path
    assert {trl_integration.REF_MODEL, trl_integration.NUM_TOKENS} <= {
        p.stem for p in Path(saved, "train_state", "stateful").iterdir()
    }

    trainer, _ = trl_script.make_trainer(str(root), str(out), max_steps=MAX_STEPS)
    trainer.train(resume_from_checkpoint=True)

    ours, theirs = logged(trainer), logged(reference)
    assert sorted(ours) == list(range(1, MAX_STEPS + 1))
    for step in (5, 6):  # every logged value of the resumed steps, num_tokens and rewards included
        assert ours[step] == theirs[step], f"step {step} differs from the uninterrupted run"
    for name, model in (("policy", "model"), ("reference", "ref_model")):
        mine, expected = weights(getattr(trainer, model)), weights(getattr(reference, model))
        assert all(torch.equal(mine[k], expected[k]) for k in expected), f"the {name} model differs"
    savepoint.verify(root)


def test_only_trl_trainers_get_trl_state(tmp_path: Path, reference) -> None:  # type: ignore[no-untyped-def]
    state = trl_integration.trainer_state(reference)
    assert set(state) == {trl_integration.REF_MODEL, trl_integration.NUM_TOKENS}
    assert state[trl_integration.NUM_TOKENS].state_dict() == {
        "num_tokens": logged(reference)[MAX_STEPS]["num_tokens"]
    }
    from transformers import Trainer

    assert not trl_integration.is_trl_trainer(Trainer.__new__(Trainer))
    assert trl_integration.trainer_state(object()) == {}


def test_sft_with_lora_resumes_with_its_token_count(tmp_path: Path) -> None:
    """An `SFTTrainer` with a LoRA adapter, stopped after a save that is not on a logging step and
    resumed (in-process), logs the uninterrupted run's losses and `num_tokens`, adapters bit-equal."""
    ref = trl_script.sft_trainer(str(tmp_path / "ref"))
    ref.train()
    stopped = trl_script.sft_trainer(str(tmp_path / "run"), stop_at=3)
    stopped.train()
    assert savepoint.CheckpointManager(tmp_path / "run").latest_step == 3
    resumed = trl_script.sft_trainer(str(tmp_path / "run"))
    resumed.train(resume_from_checkpoint=True)

    ours, theirs = logged(resumed), logged(ref)
    assert sorted(ours) == sorted(theirs) and 3 in ours  # the save step was logged
    assert {s: (e["loss"], e["num_tokens"]) for s, e in ours.items()} == {
        s: (e["loss"], e["num_tokens"]) for s, e in theirs.items()
    }
    mine, expected = weights(resumed.model), weights(ref.model)
    lora = [k for k in expected if "lora_" in k]
    assert lora and all(torch.equal(mine[k], expected[k]) for k in lora)


def test_a_checkpoint_without_trl_state_still_resumes_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TRL run checkpointed before savepoint saved TRL's own state (no `trl_num_tokens`) resumes,
    warning that the token count is not restored, instead of refusing the checkpoint."""
    with monkeypatch.context() as m:  # what an earlier savepoint saved: no TRL state
        m.setattr(trl_integration, "trainer_state", lambda trainer: {})
        trl_script.sft_trainer(str(tmp_path / "run"), stop_at=3).train()
    assert savepoint.CheckpointManager(tmp_path / "run").latest_step == 3

    resumed = trl_script.sft_trainer(str(tmp_path / "run"))
    with pytest.warns(UserWarning, match=trl_integration.NUM_TOKENS):
        resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step > 3
