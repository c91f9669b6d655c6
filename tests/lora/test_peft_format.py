"""LoRA checkpoints in PEFT's own layout, the base fingerprint, restore, and the in-memory final merge."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from tests.helpers.lora_models import (
    BUILDERS,
    adapter_checkpoint,
    make_adapter,
    perturb,
    sample_ids,
    save_base,
)
from transformers import AutoModelForCausalLM

from savepoint.errors import IncompatibleCheckpointError, MergeError
from savepoint.formats import peft as peft_format
from savepoint.lora import describe_adapter, fingerprint_dir, fingerprint_model, merge_into_staged, merge_lora
from savepoint.manifest import find_problems

VARIANTS = {
    "llama": {"target_modules": ["embed_tokens", "q_proj"], "use_dora": True, "modules_to_save": ["lm_head"]},
    "gpt2": {"target_modules": ["c_attn"], "fan_in_fan_out": True, "modules_to_save": ["ln_f"]},
    "qwen2": {"target_modules": ["q_proj", "k_proj"], "lora_bias": True, "use_rslora": True},
}


def _logits(model):
    with torch.no_grad():
        return model(input_ids=sample_ids()).logits


def _json(path):
    with open(path) as f:
        return json.load(f)


@pytest.mark.parametrize("family", sorted(VARIANTS))
def test_checkpoint_is_what_peft_writes(family, bases, tmp_path):
    model = make_adapter(family, bases[family], str(tmp_path / "peft"), **VARIANTS[family])
    ckpt = adapter_checkpoint(model, tmp_path / "run")

    with (
        safe_open(os.path.join(ckpt, "adapter_model.safetensors"), "pt") as ours,
        safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), "pt") as theirs,
    ):
        assert sorted(ours.keys()) == sorted(theirs.keys())
        assert ours.metadata() == theirs.metadata()
        for k in theirs.keys():  # noqa: SIM118 (safe_open is not a dict)
            assert torch.equal(ours.get_tensor(k), theirs.get_tensor(k)), k
    assert _json(os.path.join(ckpt, "adapter_config.json")) == _json(
        tmp_path / "peft" / "adapter_config.json"
    )
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bases[family]), ckpt).eval()
    assert torch.allclose(_logits(reloaded), _logits(model), rtol=0, atol=1e-6)
    assert find_problems(ckpt) == []


def test_checkpoint_is_small(bases, tmp_path):
    model = make_adapter("llama", bases["llama"], str(tmp_path / "peft"), target_modules=["q_proj", "v_proj"])
    ckpt = adapter_checkpoint(model, tmp_path / "run")
    size = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt))
    base_size = sum(os.path.getsize(os.path.join(bases["llama"], f)) for f in os.listdir(bases["llama"]))
    assert size < 0.15 * base_size


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_fingerprint_same_in_memory_and_on_disk(family, bases, tmp_path):
    on_disk = fingerprint_dir(bases[family])
    plain = AutoModelForCausalLM.from_pretrained(bases[family])
    assert fingerprint_model(plain) == on_disk
    wrapped = make_adapter(family, bases[family], str(tmp_path / "a"), **VARIANTS[family])
    assert fingerprint_model(wrapped) == on_disk
    as_bf16 = AutoModelForCausalLM.from_pretrained(bases[family], dtype=torch.bfloat16)
    assert fingerprint_model(as_bf16)["fingerprint"] == on_disk["fingerprint"]


def test_restore_puts_the_adapter_back(bases, tmp_path):
    model = make_adapter("qwen2", bases["qwen2"], str(tmp_path / "peft"), **VARIANTS["qwen2"])
    want = _logits(model)
    ckpt = adapter_checkpoint(model, tmp_path / "run")
    perturb(model, seed=5)
    assert not torch.allclose(_logits(model), want)
    peft_format.load_adapter_into(model, ckpt)
    assert torch.equal(_logits(model), want)
    assert set(peft_format.trainable_named_parameters(model)) and all(
        "lora_" in n for n in peft_format.trainable_named_parameters(model)
    )


def test_restore_onto_another_base_is_refused(bases, tmp_path):
    model = make_adapter("llama", bases["llama"], str(tmp_path / "peft"), target_modules=["q_proj"])
    ckpt = adapter_checkpoint(model, tmp_path / "run")
    torch.manual_seed(123)
    other_base = save_base("llama", str(tmp_path / "other"))
    with torch.no_grad():  # same architecture and shapes, other values
        other = AutoModelForCausalLM.from_pretrained(other_base)
        other.model.layers[0].mlp.up_proj.weight.mul_(2)
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(other, LoraConfig(target_modules=["q_proj"], r=4, lora_alpha=8))
    with pytest.raises(IncompatibleCheckpointError, match="another base"):
        peft_format.load_adapter_into(wrapped, ckpt)


def test_restore_with_other_rank_is_refused(bases, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = make_adapter("llama", bases["llama"], str(tmp_path / "peft"), target_modules=["q_proj"])
    ckpt = adapter_checkpoint(model, tmp_path / "run")
    other = get_peft_model(
        AutoModelForCausalLM.from_pretrained(bases["llama"]), LoraConfig(target_modules=["q_proj"], r=2)
    )
    with pytest.raises(IncompatibleCheckpointError, match="LoRA layout"):
        peft_format.load_adapter_into(other, ckpt)


def test_final_save_merges_in_memory(bases, tmp_path):
    model = make_adapter(
        "gpt2", bases["gpt2"], str(tmp_path / "peft"), target_modules=["c_attn", "wte"], fan_in_fan_out=True
    )
    ckpt = adapter_checkpoint(model, tmp_path / "run", final=True)
    assert find_problems(ckpt) == []
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(ckpt, "merged")).eval()
    assert torch.allclose(_logits(merged), _logits(model.merge_and_unload()), rtol=0, atol=1e-5)


def test_savepoint_adapter_checkpoint_checks_the_base_fingerprint(bases, tmp_path):
    model = make_adapter("llama", bases["llama"], str(tmp_path / "peft"), target_modules=["q_proj"])
    ckpt = adapter_checkpoint(model, tmp_path / "run")
    impostor = str(tmp_path / "impostor")
    other = AutoModelForCausalLM.from_pretrained(bases["llama"])
    with torch.no_grad():
        other.model.norm.weight.add_(1.0)
    other.save_pretrained(impostor)
    with pytest.raises(IncompatibleCheckpointError, match="fingerprint"):
        merge_lora(ckpt, base=impostor, out=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    merge_lora(ckpt, base=bases["llama"], out=str(tmp_path / "ok"))  # the right base merges


def test_describe_adapter(bases, tmp_path):
    make_adapter(
        "qwen2",
        bases["qwen2"],
        str(tmp_path / "a"),
        target_modules=["q_proj"],
        r=8,
        lora_alpha=16,
        use_dora=True,
    )
    info = describe_adapter(str(tmp_path / "a"))
    assert (info["r"], info["lora_alpha"], info["scaling"]) == (8, 16, 2.0)
    assert info["use_dora"] and not info["use_rslora"] and info["mergeable"]
    assert info["target_modules"] == ["q_proj"] and info["num_tensors"] == 6


def test_not_a_peft_model(bases):
    plain = AutoModelForCausalLM.from_pretrained(bases["llama"])
    assert not peft_format.is_peft_model(plain)
    with pytest.raises(MergeError, match="PeftModel"):
        merge_into_staged(plain, None)  # type: ignore[arg-type]
