"""Pytest-facing wrappers around `savepoint.demo.tiny`: cached tokenizer, corpus batches, a few train steps.

The tokenizer is trained once per session and handed out as a fresh object each time, so a test that
adds tokens or changes padding cannot leak into another.

    tok = make_tokenizer()
    model = tiny.tiny_llama(vocab_size=len(tok))
    opt = train_steps(model, tiny_corpus_batches(tok))   # optimizer with real state in it
"""

from __future__ import annotations

import functools

import torch
from tokenizers import Tokenizer
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from savepoint.demo import tiny
from savepoint.demo.data import token_blocks


@functools.cache
def _tokenizer_json(vocab_size: int) -> str:
    return tiny.train_tokenizer(tiny.load_corpus(), vocab_size).backend_tokenizer.to_str()


def make_tokenizer(vocab_size: int = tiny.DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A fresh tokenizer object, trained on the shipped corpus once per session (per vocab size)."""
    return tiny.wrap_tokenizer(Tokenizer.from_str(_tokenizer_json(vocab_size)))


@functools.cache
def _blocks(vocab_size: int, seq_len: int) -> torch.Tensor:
    return token_blocks(make_tokenizer(vocab_size), tiny.load_corpus(), seq_len=seq_len)


def tiny_corpus_batches(
    tokenizer: PreTrainedTokenizerFast | None = None,
    *,
    n: int = 4,
    batch_size: int = 2,
    seq_len: int = 32,
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """`n` batches of real corpus text (`input_ids`, `attention_mask`, `labels`), the same for a given seed.

    `tokenizer` only selects the vocabulary size (the shipped tokenizer is retrained for it).
    """
    vocab_size = len(tokenizer) if tokenizer is not None else tiny.DEFAULT_VOCAB_SIZE
    blocks = _blocks(vocab_size, seq_len)
    rows = torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(seed))[: n * batch_size]
    batches = []
    for ids in blocks[rows].split(batch_size):
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return batches


def train_steps(
    model: PreTrainedModel, batches: list[dict[str, torch.Tensor]], *, lr: float = 1e-3
) -> torch.optim.AdamW:
    """One AdamW step per batch, so weights move and the optimizer holds real state; returns the optimizer."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for batch in batches:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return optimizer


@torch.no_grad()
def logits(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    """The model's logits in eval mode (no dropout), for comparing two models exactly."""
    model.eval()
    return model(input_ids=input_ids).logits
