"""The states the benchmarks save: a ~0.6 GB bf16 Llama, and a ~1.3 GB fp32 Llama with AdamW moments.

Built on the meta device and then given uninitialised CPU storage filled with uniform noise: a real
transformers model with real tensors, without paying for transformers' (slow) weight initialisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM


@dataclass(frozen=True)
class Sizes:
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int


FULL = {
    # 14 x 16.8M + 2 x 32.8M = 300M params: 0.60 GB in bf16.
    "bf16_model": Sizes(1024, 4096, 14, 32000, 16),
    # 6 x 9.4M + 2 x 24.6M = 106M params: 0.42 GB fp32 + 0.85 GB AdamW moments = 1.27 GB.
    "train_state": Sizes(768, 3072, 6, 32000, 12),
    # A small model that really trains, for the slowdown measurement (~7M params).
    "train_loop": Sizes(256, 688, 4, 8000, 4),
}
QUICK = {
    "bf16_model": Sizes(64, 128, 4, 512, 4),
    "train_state": Sizes(64, 128, 2, 512, 4),
    "train_loop": Sizes(32, 64, 2, 256, 4),
}


def config(s: Sizes) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=s.vocab,
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )


def noise_model(s: Sizes, dtype: torch.dtype, seed: int = 0) -> LlamaForCausalLM:
    """A Llama of the given size whose weights are uniform noise (not trainable: no rotary buffers)."""
    with torch.device("meta"):
        # transformers types `.to` as its dtype-check wrapper; the call is plain nn.Module.to.
        model = LlamaForCausalLM(config(s)).to(dtype)  # type: ignore[arg-type]
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.05, 0.05, generator=gen)
    return model


def train_state(s: Sizes) -> tuple[LlamaForCausalLM, torch.optim.Optimizer]:
    """An fp32 model plus AdamW after one step, so both moments exist for every parameter."""
    model = noise_model(s, torch.float32, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.empty_like(p).uniform_(-1e-3, 1e-3)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def trainable(s: Sizes) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(config(s))


def nbytes(tensors: object) -> int:
    """Total tensor bytes in a (nested) state dict."""
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    if isinstance(tensors, dict):
        return sum(nbytes(v) for v in tensors.values())
    if isinstance(tensors, list | tuple):
        return sum(nbytes(v) for v in tensors)
    return 0
