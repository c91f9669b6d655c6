"""Fixtures shared by every test: a local tokenizer and fresh tiny models (see tests/helpers/)."""

from __future__ import annotations

import pytest
from tests.helpers.models import make_tokenizer
from transformers import PreTrainedTokenizerFast

from savepoint.demo import tiny


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    """The shipped corpus's byte-level BPE tokenizer (512 tokens; pad/bos/eos = 0/1/2), a fresh copy."""
    return make_tokenizer()


@pytest.fixture
def tiny_llama():
    """A fresh tiny Llama (seed 0, untied head, GQA), vocabulary matching `tokenizer`."""
    return tiny.tiny_llama(seed=0)


@pytest.fixture
def tiny_gpt2():
    """A fresh tiny GPT-2 (seed 0, tied head, Conv1D layers), vocabulary matching `tokenizer`."""
    return tiny.tiny_gpt2(seed=0)


@pytest.fixture
def tiny_qwen2():
    """A fresh tiny Qwen2 (seed 0, tied head, q/k/v biases), vocabulary matching `tokenizer`."""
    return tiny.tiny_qwen2(seed=0)
