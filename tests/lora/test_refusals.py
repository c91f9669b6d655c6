"""Every refusal is a SavepointError with a clear message, and leaves nothing at --out."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.helpers.lora_models import make_adapter

from savepoint.errors import IncompatibleCheckpointError, MergeError, SavepointError, UnsafeCheckpointError
from savepoint.lora import merge_lora


@pytest.fixture(scope="module")
def llama_adapter(bases, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("adapters") / "llama")
    make_adapter("llama", bases["llama"], path, target_modules=["q_proj", "v_proj"])
    return path


def _refused(tmp_path, adapter, base, error=SavepointError, match=None, **kwargs):
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        merge_lora(str(adapter), base=str(base), out=str(out), **kwargs)
    assert not out.exists() or not any(out.iterdir())
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")], "staging left behind"


def _edit_adapter(src, dst, *, tensors=None, config=None):
    shutil.copytree(src, dst)
    if tensors is not None:
        save_file(
            tensors(load_file(os.path.join(src, "adapter_model.safetensors"))),
            os.path.join(dst, "adapter_model.safetensors"),
        )
    if config is not None:
        with open(os.path.join(src, "adapter_config.json")) as f:
            doc = json.load(f)
        with open(os.path.join(dst, "adapter_config.json"), "w") as f:
            json.dump(config(doc), f)
    return dst


def test_wrong_base_names_the_missing_keys(tmp_path, llama_adapter, bases):
    _refused(
        tmp_path,
        llama_adapter,
        bases["gpt2"],
        IncompatibleCheckpointError,
        "model.layers.0.self_attn.q_proj.weight",
    )


def test_quantized_base(tmp_path, llama_adapter, bases):
    base = shutil.copytree(bases["llama"], tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(config))
    _refused(tmp_path, llama_adapter, base, MergeError, "quantized")


def test_pickled_base_is_never_unpickled(tmp_path, llama_adapter, bases):
    base = tmp_path / "base"
    base.mkdir()
    shutil.copy(os.path.join(bases["llama"], "config.json"), base)
    (base / "pytorch_model.bin").write_bytes(b"\x80\x04 not to be unpickled")
    _refused(tmp_path, llama_adapter, base, MergeError, "pytorch_model.bin")


def test_index_path_leaving_the_base(tmp_path, llama_adapter, bases):
    base = shutil.copytree(bases["llama"], tmp_path / "base")
    index = json.loads((base / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../outside.safetensors"
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    _refused(tmp_path, llama_adapter, base, UnsafeCheckpointError, "outside")


def test_out_exists_and_is_not_empty(tmp_path, llama_adapter, bases):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MergeError, match="not empty"):
        merge_lora(llama_adapter, base=bases["llama"], out=str(out))
    assert os.listdir(out) == ["keep.txt"]


def test_empty_out_dir_is_used(tmp_path, llama_adapter, bases):
    (tmp_path / "out").mkdir()
    merge_lora(llama_adapter, base=bases["llama"], out=str(tmp_path / "out"))
    assert (tmp_path / "out" / "config.json").exists()


def test_nan_names_the_tensor(tmp_path, llama_adapter, bases):
    def poison(t):
        t["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"][0, 0] = float("nan")
        return t

    adapter = _edit_adapter(llama_adapter, tmp_path / "adapter", tensors=poison)
    _refused(tmp_path, adapter, bases["llama"], MergeError, r"model\.layers\.1\.self_attn\.v_proj\.weight")


def test_inf_after_cast_is_caught(tmp_path, llama_adapter, bases):
    def overflow(t):
        t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] *= 1e6
        return t

    # finite in float32, beyond float16's 65504 once cast
    adapter = _edit_adapter(llama_adapter, tmp_path / "adapter", tensors=overflow)
    _refused(tmp_path, adapter, bases["llama"], MergeError, "q_proj.weight' is not finite", dtype="fp16")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: {**c, "peft_type": "ADALORA"}, "LoRA adapters only"),
        (lambda c: {**c, "use_bdlora": {"nblocks": 2}}, "use_bdlora"),
        (lambda c: {**c, "layer_replication": [[0, 2]]}, "layer_replication"),
    ],
)
def test_unmergeable_variants(tmp_path, llama_adapter, bases, edit, match):
    adapter = _edit_adapter(llama_adapter, tmp_path / "adapter", config=edit)
    _refused(tmp_path, adapter, bases["llama"], MergeError, match)


def test_conv_layer_lora_is_refused(tmp_path, llama_adapter, bases):
    def conv(t):
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        t[key] = t[key].reshape(*t[key].shape, 1, 1)
        return t

    adapter = _edit_adapter(llama_adapter, tmp_path / "adapter", tensors=conv)
    _refused(tmp_path, adapter, bases["llama"], MergeError, "Linear, Conv1D and Embedding")


def test_unknown_lora_tensor_is_refused(tmp_path, llama_adapter, bases):
    def extra(t):
        t["base_model.model.model.layers.0.self_attn.q_proj.lora_E"] = torch.ones(4)
        return t

    adapter = _edit_adapter(llama_adapter, tmp_path / "adapter", tensors=extra)
    _refused(tmp_path, adapter, bases["llama"], MergeError, "lora_E")


def test_lora_bias_without_base_bias(tmp_path, bases):
    # Qwen2's q_proj has a bias, Llama's (same shapes here) does not.
    adapter = str(tmp_path / "qwen")
    make_adapter("qwen2", bases["qwen2"], adapter, target_modules=["q_proj"], lora_bias=True)
    _refused(tmp_path, adapter, bases["llama"], MergeError, "no bias")


def test_tied_head_is_refused_clearly(tmp_path, bases):
    adapter = str(tmp_path / "gpt2")
    make_adapter(
        "gpt2",
        bases["gpt2"],
        adapter,
        target_modules=["c_attn"],
        fan_in_fan_out=True,
        modules_to_save=["lm_head"],
    )
    _refused(tmp_path, adapter, bases["gpt2"], IncompatibleCheckpointError, "ties its output embedding")


def test_missing_adapter_files(tmp_path, bases):
    (tmp_path / "empty").mkdir()
    _refused(tmp_path, tmp_path / "empty", bases["llama"], MergeError, "adapter_config.json")


def test_unknown_dtype(tmp_path, llama_adapter, bases):
    with pytest.raises(MergeError, match="bf16"):
        merge_lora(llama_adapter, base=bases["llama"], out=str(tmp_path / "out"), dtype="int3")
    assert not (tmp_path / "out").exists()
