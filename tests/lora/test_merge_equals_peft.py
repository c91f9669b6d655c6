"""The merged model, loaded with plain transformers, computes what peft's merge_and_unload computes."""

from __future__ import annotations

import os

import pytest
import torch
from tests.helpers.lora_models import make_adapter, sample_ids
from transformers import AutoModelForCausalLM

from savepoint.lora import merge_lora

# (family, LoraConfig kwargs): one hazard per row, several combined in the last ones.
CASES = {
    "llama-plain": ("llama", {"target_modules": ["q_proj", "v_proj"]}),
    "llama-rslora": (
        "llama",
        {"target_modules": ["q_proj", "o_proj"], "use_rslora": True, "r": 8, "lora_alpha": 4},
    ),
    "llama-dora": ("llama", {"target_modules": ["q_proj", "down_proj"], "use_dora": True}),
    "llama-all-linear-patterns": (
        "llama",
        {
            "target_modules": "all-linear",
            "rank_pattern": {"q_proj": 2},
            "alpha_pattern": {"k_proj": 3, "up_proj": 20},
        },
    ),
    "llama-embedding": ("llama", {"target_modules": ["embed_tokens", "q_proj"]}),
    "llama-embedding-dora": ("llama", {"target_modules": ["embed_tokens"], "use_dora": True}),
    "llama-modules-to-save": (
        "llama",
        {"target_modules": ["v_proj"], "modules_to_save": ["lm_head", "norm"]},
    ),
    "gpt2-conv1d": ("gpt2", {"target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True}),
    "gpt2-conv1d-dora": (
        "gpt2",
        {"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True, "use_dora": True},
    ),
    "gpt2-lora-bias": ("gpt2", {"target_modules": ["c_attn"], "fan_in_fan_out": True, "lora_bias": True}),
    "gpt2-tied-embedding": ("gpt2", {"target_modules": ["wte", "c_attn"], "fan_in_fan_out": True}),
    "gpt2-all-linear-mts": ("gpt2", {"target_modules": "all-linear", "modules_to_save": ["ln_f"]}),
    "qwen2-qkv-bias": ("qwen2", {"target_modules": ["q_proj", "k_proj", "v_proj"], "lora_bias": True}),
    "qwen2-rslora-dora": (
        "qwen2",
        {"target_modules": ["q_proj", "v_proj", "gate_proj"], "use_rslora": True, "use_dora": True},
    ),
}


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=sample_ids()).logits.float()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_matches_peft(case, bases, tmp_path):
    family, kwargs = CASES[case]
    peft_model = make_adapter(family, bases[family], str(tmp_path / "adapter"), **kwargs)
    expected = _logits(peft_model.merge_and_unload())

    out = merge_lora(
        str(tmp_path / "adapter"), base=bases[family], out=str(tmp_path / "merged"), max_shard_size="30KB"
    )

    assert not any(name.startswith("adapter") for name in os.listdir(out))
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    got = _logits(merged)
    base_logits = _logits(AutoModelForCausalLM.from_pretrained(bases[family], dtype=torch.float32).eval())
    assert _rel_err(base_logits, expected) > 1e-3, (
        "the adapter must change the model, or the test proves nothing"
    )
    assert _rel_err(got, expected) <= 1e-5
