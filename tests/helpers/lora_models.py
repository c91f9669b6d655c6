"""Tiny real transformers models and peft adapters for the LoRA tests.

Every builder seeds torch, so two calls give the same weights. Sizes are small enough that a whole
model merges in milliseconds, yet each family keeps its own hazard: Llama (plain Linear, untied head),
GPT-2 (Conv1D with transposed weights, tied head, biases), Qwen2 (q/k/v biases).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 128


def tiny_llama() -> PreTrainedModel:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2() -> PreTrainedModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def tiny_qwen2() -> PreTrainedModel:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(config).eval()


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "qwen2": tiny_qwen2}


def save_base(
    family: str, path: str, *, max_shard_size: str | int = "20KB", dtype: torch.dtype | None = None
) -> str:
    """Save a tiny base model to `path` in several safetensors shards; return `path`."""
    model = BUILDERS[family]()
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return path


def perturb(peft_model: Any, *, seed: int = 1, scale: float = 0.1) -> None:
    """Give every adapter tensor random non-zero values (LoRA B starts at zero; DoRA's magnitude at the norm)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=gen) * scale
                param.add_(noise.to(param.dtype))
                if "lora_magnitude_vector" in name:
                    param.abs_()  # a magnitude stays positive, as training keeps it


def make_adapter(family: str, base_dir: str, adapter_dir: str, **lora_kwargs: Any) -> Any:
    """Load the base from `base_dir`, wrap it with a random LoRA (`lora_kwargs` to LoraConfig), save it.

    Returns the in-memory PeftModel (float32, eval mode) so tests can compare with its merge.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(1)
    lora_kwargs.setdefault("r", 4)
    lora_kwargs.setdefault("lora_alpha", 8)
    config = LoraConfig(task_type="CAUSAL_LM", **lora_kwargs)
    model = get_peft_model(base, config)
    perturb(model)
    model.eval()
    os.makedirs(adapter_dir, exist_ok=True)
    model.save_pretrained(adapter_dir)
    return model


def sample_ids(batch: int = 2, length: int = 12) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return torch.randint(0, VOCAB, (batch, length), generator=gen)


def adapter_checkpoint(model: Any, root: str, name: str = "step-00000001", *, final: bool = False) -> str:
    """A committed savepoint checkpoint of a LoRA run, written as the manager writes one."""
    from savepoint.formats import peft as peft_format
    from savepoint.lora import merge_into_staged
    from savepoint.manifest import build_manifest
    from savepoint.storage.local import StagedDir

    staged = StagedDir(str(root), name)
    base_info = peft_format.write_adapter_files(model, staged)
    staged.write_bytes("train_state/extra.json", b"{}")
    staged.write_bytes("metrics.json", b'{"step": 1}')
    if final:
        merge_into_staged(model, staged, subdir="merged")
    return staged.commit(build_manifest("adapter", staged.entries, step=1, base_model=base_info).to_json())


def model_checkpoint(model: Any, root: str, name: str = "step-00000001") -> str:
    """A committed savepoint checkpoint of a full model, with training state beside the model files."""
    from savepoint.manifest import build_manifest
    from savepoint.storage.local import StagedDir

    staged = StagedDir(str(root), name)
    model.save_pretrained(staged.path, max_shard_size="30KB")
    staged.write_bytes("train_state/optimizer.json", b"{}")
    staged.write_bytes("metrics.json", b'{"step": 1}')
    staged.record_unlisted()
    return staged.commit(build_manifest("model", staged.entries, step=1).to_json())
