"""The helpers every other test builds on: shipped corpus, local tokenizer, tiny models, corpus batches."""

from __future__ import annotations

import pytest
import torch
from tests.helpers.models import logits, make_tokenizer, tiny_corpus_batches, train_steps
from transformers import AutoModelForCausalLM, AutoTokenizer

from savepoint.demo import tiny

SAMPLES = [
    "The gardener watered the roses behind the shed.",
    "  leading spaces, trailing spaces  ",
    "Unknown words: zyxwvut, naïve café, 東京, 🙂",
    "",
]


def test_corpus_is_shipped_prose() -> None:
    text = tiny.load_corpus()
    assert 50_000 <= len(text.encode()) <= 150_000
    paragraphs = text.split("\n\n")
    assert len(paragraphs) > 100
    assert all(p.strip().endswith((".", '"')) for p in paragraphs)


def test_tokenizer_layout(tokenizer) -> None:
    assert len(tokenizer) == tiny.DEFAULT_VOCAB_SIZE
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    # Chat-free and plain: encoding adds no special tokens of its own.
    assert tokenizer("hello")["input_ids"] == tokenizer("hello", add_special_tokens=False)["input_ids"]


def test_tokenizer_training_is_deterministic() -> None:
    a = tiny.train_tokenizer(tiny.load_corpus())
    b = tiny.train_tokenizer(tiny.load_corpus())
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()


@pytest.mark.parametrize("text", SAMPLES)
def test_tokenizer_round_trips_through_save_pretrained(tokenizer, tmp_path, text: str) -> None:
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    ids = tokenizer(text)["input_ids"]
    assert loaded(text)["input_ids"] == ids
    assert loaded.decode(ids) == text  # byte-level: lossless, even for characters never seen
    assert len(loaded) == len(tokenizer)
    assert (loaded.pad_token, loaded.bos_token, loaded.eos_token) == ("<|pad|>", "<|bos|>", "<|eos|>")


def test_make_tokenizer_hands_out_independent_copies() -> None:
    a = make_tokenizer()
    a.add_tokens(["<|only-in-a|>"])
    assert len(make_tokenizer()) == tiny.DEFAULT_VOCAB_SIZE


@pytest.mark.parametrize("family", sorted(tiny.TINY_MODELS))
def test_tiny_model_forward(family: str, tokenizer) -> None:
    model = tiny.TINY_MODELS[family]()
    ids = tokenizer(SAMPLES[0], return_tensors="pt")["input_ids"]
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(out.loss)
    assert sum(p.numel() for p in model.parameters()) < 100_000


@pytest.mark.parametrize("family", sorted(tiny.TINY_MODELS))
def test_tiny_model_round_trips_through_transformers(family: str, tokenizer, tmp_path) -> None:
    model = tiny.TINY_MODELS[family](seed=3)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    ids = tokenizer(SAMPLES[0], return_tensors="pt")["input_ids"]
    assert torch.equal(logits(model, ids), logits(loaded, ids))


@pytest.mark.parametrize("family", sorted(tiny.TINY_MODELS))
def test_builders_are_seeded_and_leave_global_rng_alone(family: str) -> None:
    build = tiny.TINY_MODELS[family]
    before = torch.get_rng_state()
    a, b, c = build(seed=0), build(seed=0), build(seed=1)
    assert torch.equal(before, torch.get_rng_state())
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_tied_embeddings_where_the_family_ties(tiny_llama, tiny_gpt2, tiny_qwen2) -> None:
    def tied(m):
        return m.get_output_embeddings().weight.data_ptr() == m.get_input_embeddings().weight.data_ptr()

    assert (tied(tiny_llama), tied(tiny_gpt2), tied(tiny_qwen2)) == (False, True, True)


def test_overrides_reach_the_config() -> None:
    model = tiny.tiny_llama(hidden_size=64, num_hidden_layers=3, attention_dropout=0.1)
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (64, 3)
    assert model.config.attention_dropout == 0.1


def test_corpus_batches_are_real_and_repeatable(tokenizer, tiny_llama) -> None:
    batches = tiny_corpus_batches(tokenizer, n=3, batch_size=2, seq_len=16)
    assert len(batches) == 3
    assert batches[0]["input_ids"].shape == (2, 16)
    again = tiny_corpus_batches(tokenizer, n=3, batch_size=2, seq_len=16)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(batches, again, strict=True))
    assert tokenizer.decode(batches[0]["input_ids"][0]).strip()
    optimizer = train_steps(tiny_llama, batches)
    assert optimizer.state  # Adam moments exist: there is optimizer state to checkpoint
