"""save_pretrained output is what transformers itself loads and writes: same files, same keys, same logits."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import savepoint
from savepoint.demo import tiny
from savepoint.manifest import find_problems

BUILDERS = {
    "llama": lambda: tiny.tiny_llama(seed=1),
    "llama-tied": lambda: tiny.tiny_llama(seed=2, tie_word_embeddings=True),
    "gpt2": lambda: tiny.tiny_gpt2(seed=3),
    "qwen2": lambda: tiny.tiny_qwen2(seed=4),
}


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return tiny.train_tokenizer(tiny.load_corpus()[:20000], vocab_size=256)


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_from_pretrained_loads_with_identical_outputs(arch: str, tmp_path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = BUILDERS[arch]()
    out = savepoint.save_pretrained(model, tmp_path / "export", tokenizer=tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(out)("hello world").input_ids == tokenizer("hello world").input_ids
    assert find_problems(out) == []


@pytest.mark.parametrize("arch", ["gpt2", "llama-tied"])
def test_tied_weights_are_stored_once_like_transformers(arch: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = BUILDERS[arch]()
    ours = savepoint.save_pretrained(model, tmp_path / "ours")
    model.save_pretrained(tmp_path / "theirs")
    with (
        safe_open(os.path.join(ours, "model.safetensors"), "pt") as a,
        safe_open(tmp_path / "theirs" / "model.safetensors", "pt") as b,
    ):
        assert sorted(a.keys()) == sorted(b.keys())
    with safe_open(os.path.join(ours, "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())


def test_shards_and_index_are_named_as_transformers_names_them(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = tiny.tiny_llama(seed=5)
    ours = savepoint.save_pretrained(model, tmp_path / "ours", max_shard_size="40KB")
    model.save_pretrained(tmp_path / "theirs", max_shard_size="40KB")
    ours_files = sorted(f for f in os.listdir(ours) if f.startswith("model"))
    theirs_files = sorted(f for f in os.listdir(tmp_path / "theirs") if f.startswith("model"))
    assert ours_files == theirs_files and len(ours_files) > 3
    ours_index = json.loads(Path(os.path.join(ours, "model.safetensors.index.json")).read_text())
    theirs_index = json.loads((tmp_path / "theirs" / "model.safetensors.index.json").read_text())
    assert ours_index["weight_map"] == theirs_index["weight_map"]
    loaded = AutoModelForCausalLM.from_pretrained(ours)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_dtype_cast_on_export(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = tiny.tiny_llama(seed=6)
    out = savepoint.save_pretrained(model, tmp_path / "bf16", dtype="bf16")
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118
    assert json.loads(Path(os.path.join(out, "config.json")).read_text())["dtype"] == "bfloat16"
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    expected = model.model.embed_tokens.weight.to(torch.bfloat16)
    assert torch.equal(loaded.model.embed_tokens.weight, expected)


def test_export_replaces_an_existing_directory_whole(tmp_path) -> None:  # type: ignore[no-untyped-def]
    first, second = tiny.tiny_llama(seed=7), tiny.tiny_llama(seed=8)
    savepoint.save_pretrained(first, tmp_path / "m", max_shard_size="40KB")
    savepoint.save_pretrained(second, tmp_path / "m")  # not sharded: old shards must not linger
    assert sorted(f for f in os.listdir(tmp_path / "m") if f.startswith("model")) == ["model.safetensors"]
    assert find_problems(str(tmp_path / "m")) == []
    assert [n for n in os.listdir(tmp_path) if n != "m"] == []


def test_plain_module_export(tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 4)
    module = torch.nn.ModuleDict({"emb": emb, "head": torch.nn.Linear(4, 10, bias=False)})
    module["head"].weight = emb.weight  # tied
    out = savepoint.save_pretrained(module, tmp_path / "mod")
    info = json.loads(Path(os.path.join(out, "savepoint_module.json")).read_text())
    assert info["aliases"] == {"head.weight": "emb.weight"}
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert list(f.keys()) == ["emb.weight"]
        assert torch.equal(f.get_tensor("emb.weight"), emb.weight.detach())
