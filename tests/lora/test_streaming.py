"""The merge streams: one file open at a time, each base tensor read once, little held at once."""

from __future__ import annotations

import json
import os
import weakref

import torch
from safetensors import safe_open as real_safe_open
from safetensors.torch import load_file
from tests.helpers.lora_models import make_adapter, save_base

import savepoint.lora.base as base_module
from savepoint.io.safetensors import open_safetensors as real_open_safetensors
from savepoint.lora import merge_lora
from savepoint.manifest import find_problems, read_manifest


def _json(path):
    with open(path) as f:
        return json.load(f)


class _Spy:
    """Wraps the base's safetensors opener: counts files open at once and the bytes of base tensors alive."""

    def __init__(self) -> None:
        self.open_now = self.max_open = 0
        self.live = self.max_live = 0
        self.reads: list[str] = []

    def __call__(self, root, relpath, **kwargs):
        spy = self
        inner = real_open_safetensors(root, relpath, **kwargs)
        spy.open_now += 1
        spy.max_open = max(spy.max_open, spy.open_now)
        real_read, real_close = inner.read, inner.close

        def read(key, *args):
            t = real_read(key, *args)
            spy.reads.append(key)
            nbytes = t.numel() * t.element_size()
            spy.live += nbytes
            spy.max_live = max(spy.max_live, spy.live)
            weakref.finalize(t, spy._freed, nbytes)
            return t

        def close():
            if inner._fd is not None:
                spy.open_now -= 1
            real_close()

        inner.read, inner.close = read, close
        return inner

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes


def test_one_file_and_one_tensor_at_a_time(tmp_path, monkeypatch):
    base = save_base("llama", str(tmp_path / "base"), max_shard_size="40KB")
    make_adapter(
        "llama", base, str(tmp_path / "adapter"), target_modules="all-linear", modules_to_save=["lm_head"]
    )
    spy = _Spy()
    monkeypatch.setattr(base_module, "open_safetensors", spy)

    merge_lora(str(tmp_path / "adapter"), base=base, out=str(tmp_path / "out"), max_shard_size="40KB")

    shard_sizes = [
        os.path.getsize(os.path.join(base, f)) for f in os.listdir(base) if f.endswith(".safetensors")
    ]
    assert len(shard_sizes) >= 3
    assert spy.max_open == 1
    index = _json(os.path.join(base, "model.safetensors.index.json"))
    assert sorted(spy.reads) == sorted(index["weight_map"]), "each base tensor is read exactly once"
    largest = max(
        t.numel() * t.element_size()
        for f in os.listdir(base)
        if f.endswith(".safetensors")
        for t in load_file(os.path.join(base, f)).values()
    )
    # In flight at most: one being merged, one queued for the writer thread, one being written.
    assert spy.max_live <= 3 * largest, "held more base tensors than the three in flight"
    assert spy.open_now == 0


def test_output_is_sharded_like_transformers(tmp_path, bases):
    make_adapter("qwen2", bases["qwen2"], str(tmp_path / "adapter"), target_modules=["q_proj"])
    out = merge_lora(
        str(tmp_path / "adapter"), base=bases["qwen2"], out=str(tmp_path / "out"), max_shard_size="30KB"
    )

    names = sorted(os.listdir(out))
    shards = [n for n in names if n.endswith(".safetensors")]
    assert all(n == f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i, n in enumerate(shards))
    index = _json(os.path.join(out, "model.safetensors.index.json"))
    assert set(index["weight_map"].values()) == set(shards)
    for shard in shards:
        with real_safe_open(os.path.join(out, shard), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert set(f.keys()) == {k for k, v in index["weight_map"].items() if v == shard}
    assert {"config.json", "generation_config.json", "savepoint.json"} <= set(names)
    assert not [n for n in names if n.startswith("adapter")]
    manifest = read_manifest(out)
    assert manifest.kind == "export" and manifest.base_model["fingerprint"]
    assert find_problems(out) == []


def test_single_file_when_small(tmp_path, bases):
    make_adapter("llama", bases["llama"], str(tmp_path / "adapter"), target_modules=["q_proj"])
    out = merge_lora(str(tmp_path / "adapter"), base=bases["llama"], out=str(tmp_path / "out"))
    assert "model.safetensors" in os.listdir(out)
    assert "model.safetensors.index.json" not in os.listdir(out)


def test_dtype_cast_and_config(tmp_path, bases):
    from transformers import AutoModelForCausalLM

    peft_model = make_adapter(
        "llama", bases["llama"], str(tmp_path / "adapter"), target_modules=["q_proj", "v_proj"]
    )
    out = merge_lora(str(tmp_path / "adapter"), base=bases["llama"], out=str(tmp_path / "out"), dtype="bf16")
    assert _json(os.path.join(out, "config.json"))["dtype"] == "bfloat16"
    with real_safe_open(os.path.join(out, "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 == {"BF16"}
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    reference = peft_model.merge_and_unload()
    ids = torch.arange(10).view(1, -1)
    with torch.no_grad():
        a, b = merged(input_ids=ids).logits, reference(input_ids=ids).logits
    assert float((a - b).norm() / b.norm()) < 2e-2  # bf16 rounding only


def test_export_dtype_streams_like_the_merge(tmp_path, monkeypatch):
    """`savepoint export --dtype` re-shards a full-model checkpoint through the same streaming path:
    one file open, each tensor read once, at most three in flight, and the bytes are the cast ones."""
    from tests.helpers.lora_models import model_checkpoint, tiny_llama

    from savepoint.lora.export import export_checkpoint

    ckpt = model_checkpoint(tiny_llama(), str(tmp_path / "run"))  # float32 shards of 30 KB
    spy = _Spy()
    monkeypatch.setattr(base_module, "open_safetensors", spy)

    out = export_checkpoint(ckpt, str(tmp_path / "out"), dtype="bf16", max_shard_size="30KB")

    source = {
        k: t
        for f in os.listdir(ckpt)
        if f.endswith(".safetensors")
        for k, t in load_file(os.path.join(ckpt, f)).items()
    }
    assert spy.max_open == 1 and spy.open_now == 0
    assert sorted(spy.reads) == sorted(source), "each tensor is read exactly once"
    largest = max(t.numel() * t.element_size() for t in source.values())
    assert spy.max_live <= 3 * largest, "held more source tensors than the three in flight"
    written = {
        k: t
        for f in os.listdir(out)
        if f.endswith(".safetensors")
        for k, t in load_file(os.path.join(out, f)).items()
    }
    assert sorted(written) == sorted(source)
    for k, t in source.items():
        assert torch.equal(written[k], t.to(torch.bfloat16)), k
    assert find_problems(out) == []
