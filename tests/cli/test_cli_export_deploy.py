"""`savepoint export` writes a deployment directory: the model and tokenizer, no training files.

Sources are real: a Trainer run through SavepointCallback, and a checkpoint the Trainer wrote itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tests.cli.cli_helpers import step_dir
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from savepoint.manifest import find_problems, read_manifest

TRAINING_FILES = (
    "trainer_state.json",
    "metrics.json",
    "training_args.bin",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state.pth",
)


def all_files(path: Path) -> list[str]:
    return sorted(str(Path(d, f).relative_to(path)) for d, _, files in os.walk(path) for f in files)


def assert_deployable(out: Path, source: Path) -> None:
    files = all_files(out)
    assert not [f for f in files if f in TRAINING_FILES or f.startswith(("train_state", "global_step"))], (
        files
    )
    assert {"config.json", "model.safetensors"} <= set(files)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    original = AutoModelForCausalLM.from_pretrained(source)
    for name, tensor in original.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_export_of_a_trainer_checkpoint_leaves_training_files_out(
    cli, trainer_run: Path, tmp_path: Path
) -> None:
    ckpt = step_dir(trainer_run, 6)
    assert (ckpt / "trainer_state.json").exists() and (ckpt / "train_state").is_dir()  # what must not go out

    result = cli("export", ckpt, tmp_path / "deploy")

    assert result.code == 0, result.err
    out = tmp_path / "deploy"
    assert_deployable(out, ckpt)
    manifest = read_manifest(str(out))  # the output's own: no training record carried over
    assert (manifest.kind, manifest.step, manifest.metrics, manifest.parent) == ("export", None, {}, None)
    assert "eval_loss" not in json.dumps(json.loads((out / "savepoint.json").read_text()))
    assert find_problems(str(out)) == []


def test_export_with_dtype_leaves_training_files_out(cli, trainer_run: Path, tmp_path: Path) -> None:
    result = cli("export", step_dir(trainer_run, 3), tmp_path / "deploy", "--dtype", "bf16")
    assert result.code == 0, result.err
    files = all_files(tmp_path / "deploy")
    assert not [f for f in files if f in TRAINING_FILES or f.startswith("train_state")], files
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "deploy").dtype == torch.bfloat16


def test_export_of_the_trainers_own_checkpoint_leaves_its_training_files_out(cli, tmp_path: Path) -> None:
    from tests.integrations.trainer_script import Rows

    from savepoint.demo import tiny

    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        save_steps=2,
        per_device_train_batch_size=2,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
    )
    Trainer(model=tiny.tiny_llama(seed=0), args=args, train_dataset=Rows(4, seed=1)).train()
    ckpt = tmp_path / "out" / "checkpoint-2"
    assert {"optimizer.pt", "trainer_state.json", "training_args.bin"} <= set(os.listdir(ckpt))

    result = cli("export", ckpt, tmp_path / "deploy")

    assert result.code == 0, result.err
    assert_deployable(tmp_path / "deploy", ckpt)
