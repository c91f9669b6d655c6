"""Tiny real transformers models whose in-memory weights differ from the Hub's layout.

transformers 5 fuses MoE experts in memory (Mixtral, Qwen3-MoE, OLMoE, DeepSeek-V3) and moves a
vision-language model's parts under new prefixes (Llava); `save_pretrained` converts back. Every
builder seeds torch, so two calls give the same weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import transformers
from transformers import PreTrainedModel

VOCAB = 128
TEXT_CONFIG = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}
MOE_CONFIG = {"num_experts_per_tok": 2, "moe_intermediate_size": 16}


def _build(config_cls: Any, model_cls: Any, **kwargs: Any) -> Callable[[], PreTrainedModel]:
    def build() -> PreTrainedModel:
        torch.manual_seed(0)
        return model_cls(config_cls(**kwargs)).eval()

    return build


BUILDERS: dict[str, Callable[[], PreTrainedModel]] = {
    "mixtral": _build(
        transformers.MixtralConfig,
        transformers.MixtralForCausalLM,
        **TEXT_CONFIG,
        num_local_experts=4,
        num_experts_per_tok=2,
    ),
    "qwen3_moe": _build(
        transformers.Qwen3MoeConfig,
        transformers.Qwen3MoeForCausalLM,
        **TEXT_CONFIG,
        **MOE_CONFIG,
        num_experts=4,
        head_dim=8,
    ),
    "olmoe": _build(
        transformers.OlmoeConfig,
        transformers.OlmoeForCausalLM,
        **TEXT_CONFIG,
        num_experts=4,
        num_experts_per_tok=2,
        eos_token_id=1,
        pad_token_id=0,
    ),
    "deepseek_v3": _build(
        transformers.DeepseekV3Config,
        transformers.DeepseekV3ForCausalLM,
        **TEXT_CONFIG,
        **MOE_CONFIG,
        n_routed_experts=4,
        n_shared_experts=1,
        first_k_dense_replace=1,
        kv_lora_rank=8,
        q_lora_rank=8,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=8,
        n_group=1,
        topk_group=1,
    ),
}


def tiny_llava() -> PreTrainedModel:
    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=8,
        patch_size=4,
        projection_dim=16,
    )
    text = transformers.LlamaConfig(**TEXT_CONFIG)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=3)
    return transformers.LlavaForConditionalGeneration(config).eval()


def sample_ids(batch: int = 2, length: int = 12) -> torch.Tensor:
    """Token ids that avoid the special ids (the Llava image token is 3)."""
    return torch.randint(4, VOCAB, (batch, length), generator=torch.Generator().manual_seed(7))


def logits(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits
