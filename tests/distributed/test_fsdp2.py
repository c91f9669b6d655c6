"""FSDP2 under torchrun (2 ranks, gloo, CPU): sharded save, HF export, exact resume, and resharding to 1 rank."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.distributed.common import assert_same, plain_reference, torchrun
from transformers import AutoModelForCausalLM

import savepoint
from savepoint.demo import tiny
from savepoint.manifest import read_manifest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp2")
    torchrun("worker_fsdp2.py", str(out))
    return out


def test_resume_at_same_world_size_is_exact(fsdp_run: Path) -> None:
    # The worker itself checked the restored weights and moments against torch's own gather.
    per_rank = json.loads((fsdp_run / "result.json").read_text())
    for rank, losses in enumerate(per_rank):
        assert losses["again"] == losses["first"], f"rank {rank} diverged after restore"
    assert per_rank[0]["first"] != per_rank[1]["first"], "ranks should see different data"


def test_every_rank_wrote_its_shards_and_the_manifest_covers_them(fsdp_run: Path) -> None:
    ckpt = fsdp_run / "run" / "step-00000002"
    manifest = read_manifest(str(ckpt))
    assert manifest.world_size == 2
    files = set(manifest.files)
    for rank in (0, 1):
        assert any(f.startswith(f"train_state/dcp/__{rank}_") for f in files), f"no DCP shard of rank {rank}"
        assert f"train_state/rng/rank-{rank:05d}.json" in files
        assert f"train_state/stateful/rank-{rank:05d}/data.json" in files
    assert "train_state/dcp/.metadata" in files and "model.safetensors" in files
    assert savepoint.verify(str(fsdp_run / "run")) == [str(ckpt)]  # every file matches, none unlisted
    assert not [p.name for p in (fsdp_run / "run").iterdir() if p.name.startswith(".tmp-")]


def test_restores_at_one_rank_without_a_process_group(fsdp_run: Path) -> None:
    ref = load_file(fsdp_run / "ref.safetensors")
    model = tiny.tiny_llama(seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    with pytest.warns(
        UserWarning, match=r"saved by 2 rank\(s\) and is restored at 1.*RNG state of rank\(s\) 1"
    ):
        result = savepoint.CheckpointManager(fsdp_run / "run").restore(
            model=model, optimizer=opt, scheduler=sched
        )
    assert result.step == 2
    assert_same(ref, plain_reference(model, opt), where="restored at 1 rank")
    assert sched.last_epoch == 2 and opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 3)


def test_export_loads_in_plain_transformers_with_the_gathered_weights(fsdp_run: Path) -> None:
    ref = load_file(fsdp_run / "ref.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = AutoModelForCausalLM.from_pretrained(fsdp_run / "export").eval()
    expected = tiny.tiny_llama(seed=7).eval()
    expected.load_state_dict({k.removeprefix("model/"): v for k, v in ref.items() if k.startswith("model/")})
    ids = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected(ids).logits)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, ref[f"model/{name}"]), name


def test_sharded_weights_restore_at_one_rank(fsdp_run: Path) -> None:
    ref = load_file(fsdp_run / "ref.safetensors")
    ckpt = fsdp_run / "sharded" / "step-00000002"
    assert read_manifest(str(ckpt)).kind == "sharded"
    assert not list(ckpt.glob("*.safetensors")), "sharded_model=True must not gather the weights"
    model = tiny.tiny_llama(seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    with pytest.warns(UserWarning, match="saved by 2"):
        savepoint.CheckpointManager(fsdp_run / "sharded").restore(model=model, optimizer=opt)
    assert_same(ref, plain_reference(model, opt), where="sharded weights restored at 1 rank")


def test_consolidate_cli_writes_a_transformers_directory(fsdp_run: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from savepoint.cli import _register_commands
    from savepoint.cli.app import app

    _register_commands()
    out = tmp_path / "model"
    args = ["consolidate", str(fsdp_run / "sharded" / "step-00000002"), str(out), "--max-shard-size", "40KB"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors.index.json").exists(), "40KB shards: the output must be sharded"
    ref = load_file(fsdp_run / "ref.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = AutoModelForCausalLM.from_pretrained(out)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, ref[f"model/{name}"]), name
    savepoint.verify(out)


def test_consolidate_refuses_what_it_cannot_vouch_for(fsdp_run: Path, tmp_path: Path) -> None:
    from savepoint.consolidate import consolidate

    with pytest.raises(savepoint.IncompatibleCheckpointError, match="nothing to consolidate"):
        consolidate(fsdp_run / "run" / "step-00000002", tmp_path / "a")  # already a model directory
    bare = fsdp_run / "sharded" / "step-00000002" / "train_state" / "dcp"
    with pytest.raises(savepoint.UnsafeCheckpointError, match="trust-dcp-metadata"):
        consolidate(bare, tmp_path / "b")  # a bare DCP directory: its .metadata is an unvouched pickle
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
