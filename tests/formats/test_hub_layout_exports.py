"""merge-lora and export on models transformers converts (MoE): the output keeps the Hub's layout and loads.

Compared with peft's merge_and_unload and with transformers' own save_pretrained of the same model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from tests.helpers.converted_models import BUILDERS, logits, sample_ids
from tests.helpers.lora_models import adapter_checkpoint, perturb
from transformers import AutoModelForCausalLM

import savepoint
from savepoint.errors import MergeError
from savepoint.lora import export_checkpoint, merge_lora

SHARD = "24KB"


def names_and_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    out = {}
    for name in os.listdir(model_dir):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(model_dir, name), "pt") as f:
                out.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})  # noqa: SIM118
    return out


def lora_on(base_dir: Path, adapter_dir: Path, **kwargs: Any) -> Any:
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, **kwargs))
    perturb(model)
    model.eval()
    model.save_pretrained(adapter_dir)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture
def base_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    BUILDERS[request.param]().save_pretrained(tmp_path / "base", max_shard_size=SHARD)
    return tmp_path / "base"


@pytest.mark.parametrize("base_dir", sorted(BUILDERS), indirect=True)
def test_merge_lora_on_attention_matches_peft_and_keeps_the_hub_layout(
    base_dir: Path, tmp_path: Path
) -> None:
    peft_model = lora_on(base_dir, tmp_path / "adapter", target_modules=["q_proj", "v_proj", "o_proj"])
    merged_by_peft = peft_model.merge_and_unload()
    expected = logits(merged_by_peft, sample_ids())
    merged_by_peft.save_pretrained(tmp_path / "peft-merged")

    out = merge_lora(
        str(tmp_path / "adapter"), base=str(base_dir), out=str(tmp_path / "ours"), max_shard_size=SHARD
    )

    assert names_and_shapes(out) == names_and_shapes(tmp_path / "peft-merged") == names_and_shapes(base_dir)
    assert rel_err(logits(AutoModelForCausalLM.from_pretrained(base_dir), sample_ids()), expected) > 1e-3
    assert rel_err(logits(AutoModelForCausalLM.from_pretrained(out), sample_ids()), expected) <= 1e-5


@pytest.mark.parametrize("base_dir", ["qwen3_moe"], indirect=True)
def test_export_merges_a_lora_checkpoint_of_a_moe_model(base_dir: Path, tmp_path: Path) -> None:
    peft_model = lora_on(base_dir, tmp_path / "adapter", target_modules=["q_proj", "k_proj"])
    ckpt = adapter_checkpoint(peft_model, str(tmp_path / "run"))
    expected = logits(peft_model.merge_and_unload(), sample_ids())

    out = export_checkpoint(ckpt, str(tmp_path / "deploy"), merge_lora=True, base=str(base_dir))

    assert names_and_shapes(out) == names_and_shapes(base_dir)
    assert rel_err(logits(AutoModelForCausalLM.from_pretrained(out), sample_ids()), expected) <= 1e-5


@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_export_of_a_moe_checkpoint_is_what_transformers_saves(dtype: str | None, tmp_path: Path) -> None:
    model = BUILDERS["mixtral"]()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = savepoint.CheckpointManager(tmp_path / "run").save(3, model=model, optimizer=opt)

    out = export_checkpoint(ckpt, str(tmp_path / "deploy"), dtype=dtype, max_shard_size=SHARD)

    reference = model.to(torch.bfloat16) if dtype else model
    reference.save_pretrained(tmp_path / "theirs")
    assert names_and_shapes(out) == names_and_shapes(tmp_path / "theirs")
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=reference.dtype)
    for (name, a), b in zip(loaded.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("base_dir", ["mixtral"], indirect=True)
def test_lora_on_fused_experts_is_refused_with_a_clear_error(base_dir: Path, tmp_path: Path) -> None:
    # peft trains LoRA on the fused expert tensors (target_parameters); merging it is not supported yet.
    lora_on(base_dir, tmp_path / "adapter", target_modules=[], target_parameters=["mlp.experts.down_proj"])
    with pytest.raises(MergeError, match="target_parameters"):
        merge_lora(str(tmp_path / "adapter"), base=str(base_dir), out=str(tmp_path / "ours"))
    assert not (tmp_path / "ours").exists()
