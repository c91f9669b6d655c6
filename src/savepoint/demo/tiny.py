"""Tiny, real Hugging Face models and a locally trained tokenizer, for the demo and the tests.

Nothing here touches a model hub: the tokenizer is trained in a second from the shipped corpus, and
the models are built from configs with random weights. Everything is deterministic, so two processes
that call the same builder with the same seed get bit-identical weights and the same vocabulary.

    >>> tok = train_tokenizer(load_corpus())
    >>> model = tiny_llama(vocab_size=len(tok))
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

# Special tokens come first in the vocabulary, so their ids are fixed whatever the corpus is.
PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
DEFAULT_VOCAB_SIZE = 512
MAX_POSITIONS = 128
# Shipped as package data (pyproject: `data/*.txt`), next to this subpackage.
CORPUS_PATH = Path(__file__).resolve().parents[1] / "data" / "demo_corpus.txt"


def load_corpus() -> str:
    """The English text shipped with savepoint (about 100 KB), used by the demo and the tests."""
    return CORPUS_PATH.read_text(encoding="utf-8")


def _paragraphs(text: str) -> Iterator[str]:
    # Training on paragraphs rather than one huge string keeps the BPE trainer's word counts small.
    return (p for p in text.split("\n\n") if p.strip())


def train_tokenizer(text: str, vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `text` and wrap it for transformers.

    Byte-level means every string encodes (no unknown token). The result has `<|pad|>`, `<|bos|>`
    and `<|eos|>` at ids 0, 1, 2, adds no special tokens by itself, and round-trips through
    `save_pretrained` / `AutoTokenizer.from_pretrained`.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_paragraphs(text), trainer=trainer)
    return wrap_tokenizer(tok)


def wrap_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a `tokenizers.Tokenizer` built by `train_tokenizer` (e.g. rebuilt from its JSON) for transformers."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=MAX_POSITIONS,
    )


def _token_ids(overrides: dict[str, Any]) -> dict[str, Any]:
    return {"pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, **overrides}


def tiny_llama_config(vocab_size: int = DEFAULT_VOCAB_SIZE, **overrides: Any) -> LlamaConfig:
    """A 2-layer Llama (hidden 32, 4 heads with 2 KV heads: grouped-query attention)."""
    base = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
    )
    return LlamaConfig(**_token_ids({**base, **overrides}))


def tiny_gpt2_config(vocab_size: int = DEFAULT_VOCAB_SIZE, **overrides: Any) -> GPT2Config:
    """A 2-layer GPT-2 (hidden 32, 2 heads). GPT-2 ties its LM head to the input embeddings."""
    base = dict(vocab_size=vocab_size, n_embd=32, n_inner=64, n_layer=2, n_head=2, n_positions=MAX_POSITIONS)
    return GPT2Config(**_token_ids({**base, **overrides}))


def tiny_qwen2_config(vocab_size: int = DEFAULT_VOCAB_SIZE, **overrides: Any) -> Qwen2Config:
    """A 2-layer Qwen2 (hidden 32, GQA, biased q/k/v, tied embeddings like the small Qwen2 models)."""
    base = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
    )
    return Qwen2Config(**_token_ids({**base, **overrides}))


def build(model_cls: type[PreTrainedModel], config: PretrainedConfig, seed: int = 0) -> PreTrainedModel:
    """Instantiate `model_cls(config)` with weights drawn from `seed`, leaving the global RNG untouched."""
    # fork_rng: building a model must not shift the caller's RNG stream (that would break exact resume).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.eval()


def tiny_llama(seed: int = 0, **overrides: Any) -> LlamaForCausalLM:
    """A freshly initialised tiny Llama; keyword overrides go to `tiny_llama_config`."""
    return build(LlamaForCausalLM, tiny_llama_config(**overrides), seed)  # type: ignore[return-value]


def tiny_gpt2(seed: int = 0, **overrides: Any) -> GPT2LMHeadModel:
    """A freshly initialised tiny GPT-2; keyword overrides go to `tiny_gpt2_config`."""
    return build(GPT2LMHeadModel, tiny_gpt2_config(**overrides), seed)  # type: ignore[return-value]


def tiny_qwen2(seed: int = 0, **overrides: Any) -> Qwen2ForCausalLM:
    """A freshly initialised tiny Qwen2; keyword overrides go to `tiny_qwen2_config`."""
    return build(Qwen2ForCausalLM, tiny_qwen2_config(**overrides), seed)  # type: ignore[return-value]


# Name -> builder, for tests and tools that iterate over architectures.
TINY_MODELS: dict[str, Callable[..., PreTrainedModel]] = {
    "llama": tiny_llama,
    "gpt2": tiny_gpt2,
    "qwen2": tiny_qwen2,
}
