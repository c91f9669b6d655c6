"""The RL examples run briefly on a tiny model, stop mid-run, and resume exactly: everything they
need goes through `stateful=`/`extra=` (no pickles), and the best-by-reward checkpoint is kept."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors.torch import load_file

import savepoint

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"savepoint_examples_{name}", EXAMPLES / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def only_json_and_safetensors(root: Path) -> None:
    files = [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert files and all(p.suffix in (".json", ".safetensors") for p in files), sorted(
        {p.suffix for p in files}
    )


def same_files(a: Path, b: Path, name: str) -> None:
    x, y = load_file(a / name), load_file(b / name)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f"{name} differs"


def test_ppo_resumes_exactly_and_keeps_best_by_reward(tmp_path: Path) -> None:
    ppo = load_example("ppo_trlx_style")
    cfg = ppo.Config(steps=8, checkpoint_interval=3)
    ref_log: list[str] = []
    ppo.train(str(tmp_path / "ref"), cfg, log=ref_log.append)
    with pytest.raises(KeyboardInterrupt):
        ppo.train(str(tmp_path / "run"), cfg, stop_at=5, log=lambda _: None)  # last save: step 3
    resumed: list[str] = []
    ppo.train(str(tmp_path / "run"), cfg, log=resumed.append)

    assert [json.loads(x)["step"] for x in resumed] == [4, 5, 6, 7, 8]
    assert resumed == ref_log[3:], "PPO diverged after resume (KL coef, reward stats, RNG or data)"
    final = "step-00000008"
    for name in (
        "model.safetensors",
        "train_state/stateful/value_head.safetensors",
        "train_state/optimizer.safetensors",
    ):
        same_files(tmp_path / "run" / final, tmp_path / "ref" / final, name)
    mgr = savepoint.CheckpointManager(tmp_path / "run", best_metric="reward", best_mode="max")
    rewards = {s: json.loads(x)["reward"] for s, x in zip(range(1, 9), ref_log, strict=True)}
    best = max((3, 6, 8), key=lambda s: rewards[s])
    assert mgr.best_step == best and best in [i.step for i in mgr.checkpoints]
    only_json_and_safetensors(tmp_path / "run")


@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_halos_rounds_resume_exactly_and_merge(tmp_path: Path, loss: str) -> None:
    dpo = load_example("dpo_halos_style")
    cfg = dpo.Config(rounds=2, steps_per_round=4, eval_every=2, loss=loss)
    ref_log: list[str] = []
    dpo.train(str(tmp_path / "ref"), cfg, log=ref_log.append)
    with pytest.raises(KeyboardInterrupt):
        dpo.train(str(tmp_path / "run"), cfg, stop_at=(2, 3), log=lambda _: None)  # round 2 saved at step 2
    resumed: list[str] = []
    dpo.train(str(tmp_path / "run"), cfg, log=resumed.append)

    assert [(json.loads(x)["round"], json.loads(x)["step"]) for x in resumed] == [(2, 3), (2, 4)]
    assert resumed == ref_log[-2:], "round 2 diverged after resume"
    for round_ in (1, 2):
        final = Path(f"round-{round_}") / "step-00000004"
        assert (tmp_path / "run" / final / "merged" / "config.json").is_file()  # the final save merged LoRA
        same_files(tmp_path / "run" / final, tmp_path / "ref" / final, "adapter_model.safetensors")
        same_files(
            tmp_path / "run" / final / "merged", tmp_path / "ref" / final / "merged", "model.safetensors"
        )
        mgr = savepoint.CheckpointManager(
            tmp_path / "run" / f"round-{round_}", best_metric="eval_reward_margin", best_mode="max"
        )
        assert mgr.best_step in [i.step for i in mgr.checkpoints]
        savepoint.verify(tmp_path / "run" / f"round-{round_}")
    only_json_and_safetensors(tmp_path / "run")
