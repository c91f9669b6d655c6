"""DeepSpeed ZeRO-2 and ZeRO-3 engines under torchrun (2 ranks, gloo, CPU): `model=engine` saves a
transformers directory plus the engine's own per-rank state inside savepoint's atomic commit,
resumes exactly, and `savepoint consolidate` turns the engine's checkpoint into an HF directory."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.distributed.common import torchrun

import savepoint
from savepoint.manifest import read_manifest

pytestmark = pytest.mark.slow
os.environ.setdefault("DS_ACCELERATOR", "cpu")
pytest.importorskip("deepspeed")
STAGES = ["zero2", "zero3"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deepspeed")
    torchrun("worker_deepspeed.py", str(out))  # the worker checks the in-place restore on both ranks
    return out


def load_model(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(path)


def assert_weights(path: Path, ref: dict[str, torch.Tensor]) -> None:
    state = load_model(path).state_dict()
    assert state.keys() == ref.keys()
    for name, tensor in state.items():
        assert torch.equal(tensor, ref[name]), f"{path.name}: {name}"


@pytest.mark.parametrize("stage", STAGES)
def test_resume_at_same_world_size_is_exact(run: Path, stage: str) -> None:
    for rank, losses in enumerate(json.loads((run / "result.json").read_text())):
        assert losses[stage]["again"] == losses[stage]["first"], (
            f"{stage}: rank {rank} diverged after restore"
        )


@pytest.mark.parametrize("stage", STAGES)
def test_checkpoint_is_a_transformers_directory_covering_every_ranks_engine_files(
    run: Path, stage: str
) -> None:
    ckpt = run / stage / "step-00000002"
    manifest = read_manifest(str(ckpt))
    assert manifest.kind == "model" and manifest.world_size == 2
    engine_files = [f for f in manifest.files if f.startswith("train_state/deepspeed/global_step2/")]
    for rank in (0, 1):
        assert any(f"zero_pp_rank_{rank}_" in f and f.endswith("_optim_states.pt") for f in engine_files)
    assert not [f for f in manifest.files if f.endswith(".py")], "no code in a checkpoint"
    assert savepoint.verify(str(run / stage)) == [str(ckpt)]  # every file listed and matching
    ref = load_file(run / f"ref-{stage}.safetensors")
    assert_weights(ckpt, ref)
    assert_weights(run / f"{stage}-export", ref)


@pytest.mark.parametrize("stage", STAGES)
def test_consolidate_reads_the_engine_checkpoint_into_an_hf_directory(
    run: Path, stage: str, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from savepoint.cli import _register_commands
    from savepoint.cli.app import app

    _register_commands()
    source = run / stage / "step-00000002" / "train_state" / "deepspeed"
    out = tmp_path / "model"
    result = CliRunner().invoke(app, ["consolidate", str(source), str(out), "--max-shard-size", "40KB"])
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors.index.json").exists() and (out / "config.json").exists()
    # fp32 training: the fp32 master weights equal the module's weights
    assert_weights(out, load_file(run / f"ref-{stage}.safetensors"))
    savepoint.verify(out)


def test_a_damaged_engine_file_is_caught_before_it_is_unpickled(run: Path, tmp_path: Path) -> None:
    import shutil

    ckpt = tmp_path / "run" / "step-00000002"
    shutil.copytree(run / "zero3" / "step-00000002", ckpt)
    victim = ckpt / "train_state" / "deepspeed" / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    victim.write_bytes(victim.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(savepoint.CorruptCheckpointError, match="zero_pp_rank_1"):
        savepoint.verify(str(tmp_path / "run"))


def test_weights_restore_into_a_plain_model_in_one_process(run: Path) -> None:
    from savepoint.demo import tiny

    model = tiny.tiny_llama(seed=9)
    with pytest.warns(UserWarning, match="saved by 2"):
        assert savepoint.CheckpointManager(run / "zero3").restore(model=model).step == 2
    ref = load_file(run / "ref-zero3.safetensors")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ref[name]), name
