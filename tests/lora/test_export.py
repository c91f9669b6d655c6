"""`export_checkpoint` and the `merge-lora` / `export` commands."""

from __future__ import annotations

import os

import pytest
import torch
from tests.helpers.lora_models import BUILDERS, adapter_checkpoint, make_adapter, model_checkpoint, sample_ids
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from savepoint.errors import CorruptCheckpointError, MergeError
from savepoint.lora import export_checkpoint
from savepoint.manifest import find_problems, read_manifest


def _logits(model):
    with torch.no_grad():
        return model(input_ids=sample_ids()).logits


def _all_files(path):
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)


@pytest.fixture
def full_ckpt(tmp_path):
    return model_checkpoint(BUILDERS["qwen2"](), str(tmp_path / "run"))


def test_full_model_export_drops_training_state(full_ckpt, tmp_path):
    out = export_checkpoint(full_ckpt, str(tmp_path / "out"))
    files = _all_files(out)
    assert not [f for f in files if f.startswith("train_state") or f == "metrics.json"]
    assert "model.safetensors.index.json" in files and "savepoint.json" in files
    assert read_manifest(out).kind == "export" and find_problems(out) == []
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(out)), _logits(BUILDERS["qwen2"]()))


def test_full_model_export_with_dtype(full_ckpt, tmp_path):
    out = export_checkpoint(full_ckpt, str(tmp_path / "out"), dtype="fp16")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float16
    assert find_problems(out) == []


def test_damaged_checkpoint_is_not_exported(full_ckpt, tmp_path):
    shard = next(f for f in os.listdir(full_ckpt) if f.startswith("model-"))
    with open(os.path.join(full_ckpt, shard), "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\xff\xff\xff\xff")
    with pytest.raises(CorruptCheckpointError, match=shard):
        export_checkpoint(full_ckpt, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_lora_export_merges_onto_recorded_base(bases, tmp_path):
    model = make_adapter("llama", bases["llama"], str(tmp_path / "peft"), target_modules=["q_proj", "v_proj"])
    ckpt = adapter_checkpoint(model, str(tmp_path / "run"))
    out = export_checkpoint(ckpt, str(tmp_path / "out"), merge_lora=True)
    assert not [f for f in os.listdir(out) if f.startswith("adapter") or f in ("metrics.json", "train_state")]
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert torch.allclose(_logits(merged), _logits(model.merge_and_unload()), rtol=0, atol=1e-5)


def test_lora_export_without_merge_is_an_adapter(bases, tmp_path):
    model = make_adapter("llama", bases["llama"], str(tmp_path / "peft"), target_modules=["q_proj"])
    ckpt = adapter_checkpoint(model, str(tmp_path / "run"), final=True)
    out = export_checkpoint(ckpt, str(tmp_path / "out"))
    assert _all_files(out) == ["adapter_config.json", "adapter_model.safetensors", "savepoint.json"]
    with pytest.raises(MergeError, match="--merge-lora"):
        export_checkpoint(ckpt, str(tmp_path / "out2"), dtype="bf16")


def test_lora_export_reuses_the_final_merge(bases, tmp_path):
    model = make_adapter(
        "gpt2", bases["gpt2"], str(tmp_path / "peft"), target_modules=["c_attn"], fan_in_fan_out=True
    )
    ckpt = adapter_checkpoint(model, str(tmp_path / "run"), final=True)
    out = export_checkpoint(ckpt, str(tmp_path / "out"), merge_lora=True)
    assert sorted(os.listdir(out)) == sorted([*os.listdir(os.path.join(ckpt, "merged")), "savepoint.json"])
    assert torch.allclose(
        _logits(AutoModelForCausalLM.from_pretrained(out)), _logits(model.merge_and_unload()), atol=1e-5
    )


def test_merge_lora_on_full_model_is_refused(full_ckpt, tmp_path):
    with pytest.raises(MergeError, match="not a LoRA checkpoint"):
        export_checkpoint(full_ckpt, str(tmp_path / "out"), merge_lora=True)
    assert not (tmp_path / "out").exists()


@pytest.fixture
def cli():
    import savepoint.cli.lora  # noqa: F401  (registers the commands)
    from savepoint.cli.app import app

    return lambda *args: CliRunner().invoke(app, [str(a) for a in args])


def test_cli_merge_lora(cli, bases, tmp_path):
    model = make_adapter(
        "qwen2", bases["qwen2"], str(tmp_path / "peft"), target_modules=["q_proj"], lora_bias=True
    )
    result = cli(
        "merge-lora",
        tmp_path / "peft",
        "--base",
        bases["qwen2"],
        "--out",
        tmp_path / "out",
        "--dtype",
        "fp32",
    )
    assert result.exit_code == 0, result.output
    assert "merged model written" in result.output
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert torch.allclose(_logits(merged), _logits(model.merge_and_unload()), rtol=0, atol=1e-5)


def test_cli_refusal_exits_non_zero(cli, bases, tmp_path):
    make_adapter("llama", bases["llama"], str(tmp_path / "peft"), target_modules=["q_proj"])
    result = cli("merge-lora", tmp_path / "peft", "--base", bases["gpt2"], "--out", tmp_path / "out")
    assert result.exit_code != 0
    assert not (tmp_path / "out").exists()


def test_cli_export(cli, full_ckpt, tmp_path):
    result = cli("export", full_ckpt, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "config.json").exists()
