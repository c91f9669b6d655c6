"""LoRA under FSDP2 and full models under FSDP1, 2 ranks under torchrun (gloo, CPU).

The LoRA checkpoint of a sharded PeftModel is the whole adapter in PEFT's layout, fingerprinted
against the full base as a plain process fingerprints it; FSDP1 saves, exports and resumes exactly.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.distributed.common import assert_same, plain_reference, torchrun

import savepoint
from savepoint.demo import tiny
from savepoint.manifest import read_manifest

pytestmark = pytest.mark.slow
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lora_fsdp")
    torchrun("worker_lora_fsdp.py", str(out))  # the worker checks the in-place restores on both ranks
    return out


def plain_lora(seed: int = 0) -> torch.nn.Module:
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return peft.get_peft_model(tiny.tiny_llama(seed=seed), config)


@pytest.mark.parametrize("kind", ["lora", "fsdp1"])
def test_resume_at_same_world_size_is_exact(run: Path, kind: str) -> None:
    for rank, losses in enumerate(json.loads((run / "result.json").read_text())):
        assert losses[kind]["again"] == losses[kind]["first"], f"{kind}: rank {rank} diverged after restore"


def test_sharded_lora_checkpoint_is_the_whole_adapter_in_peft_layout(run: Path) -> None:
    ckpt = run / "lora" / "step-00000002"
    manifest = read_manifest(str(ckpt))
    assert manifest.kind == "adapter" and manifest.world_size == 2
    assert (ckpt / "adapter_config.json").exists() and not (ckpt / "model.safetensors").exists()
    # The fingerprint is the full base's, exactly as a plain process computes it.
    from savepoint.lora.fingerprint import fingerprint_model

    assert manifest.base_model["fingerprint"] == fingerprint_model(plain_lora())["fingerprint"]
    loaded = peft.PeftModel.from_pretrained(tiny.tiny_llama(seed=0), ckpt)
    ref = load_file(run / "ref-lora.safetensors")
    lora = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert len(lora) == 8
    for name, tensor in lora.items():
        assert torch.equal(tensor, ref[f"model/{name}"]), name
    savepoint.verify(run / "lora")


def test_sharded_lora_restores_in_one_process(run: Path) -> None:
    model = plain_lora()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with pytest.warns(UserWarning, match="saved by 2"):
        assert savepoint.CheckpointManager(run / "lora").restore(model=model, optimizer=opt).step == 2
    ref = load_file(run / "ref-lora.safetensors")
    trainable = {k: v for k, v in plain_reference(model, opt).items() if "lora_" in k}
    assert_same(ref, trainable, where="LoRA restored at 1 rank")


def test_sharded_lora_refuses_another_base(run: Path) -> None:
    with pytest.raises(savepoint.IncompatibleCheckpointError, match="another base model"):
        savepoint.CheckpointManager(run / "lora").restore(model=plain_lora(seed=3), step=2)


def test_fsdp1_checkpoint_and_export_are_transformers_directories(run: Path) -> None:
    from transformers import AutoModelForCausalLM

    ref = load_file(run / "ref-fsdp1.safetensors")
    for path in (run / "fsdp1" / "step-00000002", run / "fsdp1-export"):
        assert read_manifest(str(path)).kind in ("model", "export")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = AutoModelForCausalLM.from_pretrained(path)
        for name, tensor in loaded.state_dict().items():
            assert torch.equal(tensor, ref[f"model/{name}"]), f"{path.name}: {name}"
    model = tiny.tiny_llama(seed=9)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with pytest.warns(UserWarning, match="saved by 2"):
        savepoint.CheckpointManager(run / "fsdp1").restore(model=model, optimizer=opt)
    assert_same(ref, plain_reference(model, opt), where="FSDP1 restored at 1 rank")
