"""merge-lora and export on models transformers converts (MoE): the output keeps the Hub's layout and loads.

Compared with peft's merge_and_unload and with transformers' own save_pretrained of the same model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file
from tests.helpers.converted_models import BUILDERS, TEXT_CONFIG, logits, sample_ids
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


@pytest.mark.parametrize(
    ("arch", "dtype"), [*((arch, None) for arch in [*sorted(BUILDERS), "llava"]), ("mixtral", "bf16")]
)
def test_export_of_a_converted_checkpoint_is_what_transformers_saves(
    arch: str, dtype: str | None, tmp_path: Path
) -> None:
    from tests.helpers.converted_models import tiny_llava

    model = tiny_llava() if arch == "llava" else BUILDERS[arch]()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = savepoint.CheckpointManager(tmp_path / "run").save(3, model=model, optimizer=opt)

    out = export_checkpoint(ckpt, str(tmp_path / "deploy"), dtype=dtype, max_shard_size=SHARD)

    reference = model.to(torch.bfloat16) if dtype else model
    reference.save_pretrained(tmp_path / "theirs", max_shard_size=SHARD)
    assert names_and_shapes(out) == names_and_shapes(tmp_path / "theirs")
    ours, theirs = tensors(out), tensors(tmp_path / "theirs")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    model_cls = transformers.LlavaForConditionalGeneration if arch == "llava" else AutoModelForCausalLM
    loaded = model_cls.from_pretrained(out, dtype=reference.dtype)
    for (name, a), b in zip(loaded.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def tensors(model_dir: str | Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name in os.listdir(model_dir):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(model_dir, name)))
    return out


def assert_same_model(ours: str | Path, peft_merged: str | Path, base: str | Path) -> None:
    theirs, before = tensors(peft_merged), tensors(base)
    assert names_and_shapes(ours) == names_and_shapes(peft_merged)
    got = tensors(ours)
    assert {k for k in theirs if not torch.equal(theirs[k], before[k])}  # the merge changed something
    for name, want in theirs.items():
        assert got[name].dtype == want.dtype, name
        torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("base_dir", ["mixtral", "qwen3_moe"], indirect=True)
def test_merge_lora_on_fused_experts_matches_peft_in_the_hub_layout(base_dir: Path, tmp_path: Path) -> None:
    # peft trains LoRA on the fused in-memory expert tensors (target_parameters); the Hub has one per expert.
    peft_model = lora_on(base_dir, tmp_path / "adapter", target_modules=["q_proj"], target_parameters=EXPERTS)
    merged_by_peft = peft_model.merge_and_unload()
    expected = logits(merged_by_peft, sample_ids())
    merged_by_peft.save_pretrained(tmp_path / "peft-merged", max_shard_size=SHARD)

    out = merge_lora(
        str(tmp_path / "adapter"), base=str(base_dir), out=str(tmp_path / "ours"), max_shard_size=SHARD
    )

    assert_same_model(out, tmp_path / "peft-merged", base_dir)
    assert any(".experts.0." in name for name in names_and_shapes(out))  # per-expert, as on the Hub
    assert rel_err(logits(AutoModelForCausalLM.from_pretrained(base_dir), sample_ids()), expected) > 1e-3
    assert rel_err(logits(AutoModelForCausalLM.from_pretrained(out), sample_ids()), expected) <= 1e-5


def tiny_gpt_oss() -> Any:
    # Experts stored fused on the Hub too, and transposed: (experts, in, out), peft's `is_transposed`.
    torch.manual_seed(0)
    config = transformers.GptOssConfig(
        **{**TEXT_CONFIG, "intermediate_size": 16},
        num_local_experts=4,
        num_experts_per_tok=2,
        head_dim=8,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
    )
    return transformers.GptOssForCausalLM(config).eval()


def test_merge_lora_on_transposed_fused_experts_matches_peft(tmp_path: Path) -> None:
    tiny_gpt_oss().save_pretrained(tmp_path / "base")
    peft_model = lora_on(
        tmp_path / "base", tmp_path / "adapter", target_modules=[], target_parameters=EXPERTS
    )
    peft_model.merge_and_unload().save_pretrained(tmp_path / "peft-merged")

    out = merge_lora(str(tmp_path / "adapter"), base=str(tmp_path / "base"), out=str(tmp_path / "ours"))

    assert_same_model(out, tmp_path / "peft-merged", tmp_path / "base")


@pytest.mark.parametrize("base_dir", ["qwen3_moe"], indirect=True)
def test_export_merges_a_lora_checkpoint_on_fused_experts(base_dir: Path, tmp_path: Path) -> None:
    peft_model = lora_on(base_dir, tmp_path / "adapter", target_modules=[], target_parameters=EXPERTS[1:])
    ckpt = adapter_checkpoint(peft_model, str(tmp_path / "run"))
    peft_model.merge_and_unload().save_pretrained(tmp_path / "peft-merged")

    out = export_checkpoint(ckpt, str(tmp_path / "deploy"), merge_lora=True, base=str(base_dir))

    assert_same_model(out, tmp_path / "peft-merged", base_dir)


@pytest.mark.parametrize("base_dir", ["mixtral"], indirect=True)
def test_lora_on_a_2d_parameter_is_refused_with_a_clear_error(base_dir: Path, tmp_path: Path) -> None:
    lora_on(base_dir, tmp_path / "adapter", target_modules=[], target_parameters=["self_attn.q_proj.weight"])
    with pytest.raises(MergeError, match="3-D"):
        merge_lora(str(tmp_path / "adapter"), base=str(base_dir), out=str(tmp_path / "ours"))
    assert not (tmp_path / "ours").exists()


@pytest.mark.parametrize("base_dir", ["mixtral"], indirect=True)
def test_dora_with_target_parameters_is_refused(base_dir: Path, tmp_path: Path) -> None:
    lora_on(base_dir, tmp_path / "adapter", target_modules=[], target_parameters=EXPERTS)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(MergeError, match="use_dora"):
        merge_lora(str(tmp_path / "adapter"), base=str(base_dir), out=str(tmp_path / "ours"))
    assert not (tmp_path / "ours").exists()


@pytest.mark.parametrize("base_dir", ["mixtral"], indirect=True)
def test_a_final_save_merges_lora_on_fused_experts_into_the_hub_layout(
    base_dir: Path, tmp_path: Path
) -> None:
    # final=True merges the live PeftModel (its base weights come from memory, fused): same output.
    peft_model = lora_on(base_dir, tmp_path / "adapter", target_modules=["q_proj"], target_parameters=EXPERTS)
    ckpt = adapter_checkpoint(peft_model, str(tmp_path / "run"), final=True)
    peft_model.merge_and_unload().save_pretrained(tmp_path / "peft-merged")

    assert_same_model(os.path.join(ckpt, "merged"), tmp_path / "peft-merged", base_dir)


# ---------------------------------------------------------------- a vision-language model


@pytest.fixture
def llava_dir(tmp_path: Path) -> Path:
    from tests.helpers.converted_models import tiny_llava

    tiny_llava().save_pretrained(tmp_path / "base", max_shard_size=SHARD)
    return tmp_path / "base"


def llava_lora(base_dir: Path, adapter_dir: Path) -> Any:
    """LoRA on attention of both towers; peft names the adapter's tensors after the model in memory
    (`model.language_model.layers...`), while the base on disk has the Hub's (`language_model.model...`)."""
    base = transformers.LlavaForConditionalGeneration.from_pretrained(base_dir)
    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    perturb(model)
    model.eval()
    model.save_pretrained(adapter_dir)
    return model


def test_merge_lora_into_a_vlm_matches_peft_in_the_hub_layout(llava_dir: Path, tmp_path: Path) -> None:
    peft_model = llava_lora(llava_dir, tmp_path / "adapter")
    ckpt = adapter_checkpoint(peft_model, str(tmp_path / "run"), final=True)
    peft_model.merge_and_unload().save_pretrained(tmp_path / "peft-merged", max_shard_size=SHARD)

    merged = merge_lora(
        str(tmp_path / "adapter"), base=str(llava_dir), out=str(tmp_path / "ours"), max_shard_size=SHARD
    )
    exported = export_checkpoint(ckpt, str(tmp_path / "deploy"), merge_lora=True, base=str(llava_dir))
    for out in (merged, exported, os.path.join(ckpt, "merged")):
        assert_same_model(out, tmp_path / "peft-merged", llava_dir)
