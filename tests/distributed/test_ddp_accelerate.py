"""DDP and Accelerate-prepared models under torchrun (2 ranks, gloo): rank 0 writes the replicated
state once, every rank its RNG; the checkpoint restores in place and in a plain single process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.distributed.common import assert_same, plain_reference, torchrun

import savepoint
from savepoint.demo import tiny
from savepoint.manifest import read_manifest

pytestmark = pytest.mark.slow
BUILDERS = {"ddp": tiny.tiny_gpt2, "accelerate": tiny.tiny_llama}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    torchrun("worker_ddp.py", str(out))  # the worker checks the in-place restore on both ranks
    return out


@pytest.mark.parametrize("kind", ["ddp", "accelerate"])
def test_layout(ddp_run: Path, kind: str) -> None:
    manifest = read_manifest(str(ddp_run / kind / "step-00000002"))
    assert manifest.world_size == 2
    files = set(manifest.files)
    assert {"model.safetensors", "train_state/optimizer.json", "train_state/rng/rank-00001.json"} <= files
    assert not any(f.startswith("train_state/dcp/") for f in files), "replicated state needs no sharding"
    savepoint.verify(ddp_run / kind)


@pytest.mark.parametrize("kind", ["ddp", "accelerate"])
def test_restores_in_one_process(ddp_run: Path, kind: str) -> None:
    model = BUILDERS[kind](seed=9)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with pytest.warns(
        UserWarning, match=r"saved by 2 rank\(s\) and is restored at 1.*RNG state of rank\(s\) 1"
    ):
        savepoint.CheckpointManager(ddp_run / kind).restore(model=model, optimizer=opt)
    assert_same(load_file(ddp_run / f"ref-{kind}.safetensors"), plain_reference(model, opt), where=kind)


def test_export_of_tied_model_loads(ddp_run: Path) -> None:
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(ddp_run / "ddp-export")
    ref = load_file(ddp_run / "ref-ddp.safetensors")
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, ref[f"model/{name}"]), name


def test_lora_under_ddp_is_a_peft_adapter_directory(ddp_run: Path) -> None:
    from peft import PeftModel

    ckpt = ddp_run / "lora" / "step-00000002"
    assert read_manifest(str(ckpt)).kind == "adapter"
    assert (ckpt / "adapter_model.safetensors").exists() and not (ckpt / "model.safetensors").exists()
    loaded = PeftModel.from_pretrained(tiny.tiny_llama(seed=0), ckpt)
    ref = load_file(ddp_run / "ref-lora.safetensors")
    lora = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert lora and all(torch.equal(v, ref[f"model/{k}"]) for k, v in lora.items())
