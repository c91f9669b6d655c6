"""Models that transformers converts on load are written in the Hub's layout, as its save_pretrained writes them.

Compared with transformers itself: the same files, index, tensor names, shapes and bytes; from_pretrained of
savepoint's output gives the same logits; a checkpoint restores into the live (fused) model exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from tests.helpers.converted_models import BUILDERS, logits, sample_ids, tiny_llava
from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

import savepoint
from savepoint.errors import IncompatibleCheckpointError
from savepoint.formats import hf

ALL = {**BUILDERS, "llava": tiny_llava}
SHARD = "24KB"  # several shards, so the split and the index are compared too


def weight_files(model_dir: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every safetensors file of a model directory: file name -> its tensors."""
    out = {}
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(model_dir, name), "pt") as f:
                out[name] = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iteration)
    return out


def assert_same_weights(ours: str | Path, theirs: str | Path) -> None:
    a, b = weight_files(ours), weight_files(theirs)
    assert sorted(a) == sorted(b)
    for name in a:
        assert sorted(a[name]) == sorted(b[name]), name
        for key, tensor in a[name].items():
            other = b[name][key]
            assert (tensor.shape, tensor.dtype) == (other.shape, other.dtype), key
            assert torch.equal(tensor, other), key
    index = "model.safetensors.index.json"
    if os.path.exists(os.path.join(theirs, index)):
        assert json.loads(Path(ours, index).read_text()) == json.loads(Path(theirs, index).read_text())


def load(arch: str, path: str) -> Any:
    cls = LlavaForConditionalGeneration if arch == "llava" else AutoModelForCausalLM
    return cls.from_pretrained(path)


@pytest.mark.parametrize("arch", sorted(ALL))
def test_save_pretrained_writes_what_transformers_writes(arch: str, tmp_path: Path) -> None:
    model = ALL[arch]()
    ours = savepoint.save_pretrained(model, tmp_path / "ours", max_shard_size=SHARD)
    model.save_pretrained(tmp_path / "theirs", max_shard_size=SHARD)
    assert_same_weights(ours, tmp_path / "theirs")
    if arch != "llava":  # the MoE layouts are the Hub's: one tensor per expert, nothing fused
        names = [k for tensors in weight_files(ours).values() for k in tensors]
        assert not any(k.endswith(("gate_up_proj", "experts.down_proj")) for k in names)
        assert any(".experts.3." in k for k in names)
    torch.testing.assert_close(
        logits(load(arch, ours), sample_ids()), logits(model, sample_ids()), rtol=0, atol=0
    )


@pytest.mark.parametrize("arch", ["mixtral", "llava"])
def test_model_loaded_by_from_pretrained_saves_and_restores_like_transformers(
    arch: str, tmp_path: Path
) -> None:
    # from_pretrained records the conversions it used; save_pretrained reverts those, and so do we.
    ALL[arch]().save_pretrained(tmp_path / "hub")
    model = load(arch, str(tmp_path / "hub"))
    path = savepoint.CheckpointManager(tmp_path / "run").save(1, model=model)
    model.save_pretrained(tmp_path / "theirs")
    assert_same_weights(path, tmp_path / "theirs")
    fresh = load(arch, str(tmp_path / "hub"))
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    savepoint.CheckpointManager(tmp_path / "run").restore(model=fresh)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> float:
    model.train()
    ids = torch.randint(4, 128, (2, 10), generator=torch.Generator().manual_seed(seed))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    return float(loss)


@pytest.mark.parametrize(
    ("arch", "async_save"),
    [(arch, mode) for arch in ("mixtral", "deepseek_v3") for mode in (False, True)]
    + [("mixtral", "process")],
)
def test_checkpoint_has_hub_layout_and_resumes_exactly(
    arch: str, async_save: bool | str, tmp_path: Path
) -> None:
    model = BUILDERS[arch]()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_step(model, opt, 0)
    mgr = savepoint.CheckpointManager(tmp_path / "run", async_save=async_save)
    path = mgr.save(1, model=model, optimizer=opt)
    mgr.wait()
    mgr.close()  # the writer process (async_save="process") exits
    model.save_pretrained(tmp_path / "theirs")
    assert_same_weights(path, tmp_path / "theirs")
    expected = [train_step(model, opt, s) for s in (1, 2)]

    fresh = BUILDERS[arch]()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    assert savepoint.CheckpointManager(tmp_path / "run").restore(model=fresh, optimizer=fresh_opt).step == 1
    assert [train_step(fresh, fresh_opt, s) for s in (1, 2)] == expected
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_checkpoint_in_the_fused_layout_of_older_versions_still_restores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = BUILDERS["qwen3_moe"]()
    monkeypatch.setattr(hf, "plan_hub_layout", lambda model, state: None)
    path = savepoint.CheckpointManager(tmp_path).save(1, model=model)
    monkeypatch.undo()
    assert any(k.endswith("gate_up_proj") for t in weight_files(path).values() for k in t)
    fresh = BUILDERS["qwen3_moe"]()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    savepoint.CheckpointManager(tmp_path).restore(model=fresh)
    torch.testing.assert_close(logits(fresh, sample_ids()), logits(model, sample_ids()), rtol=0, atol=0)


def test_restore_into_another_expert_count_names_the_tensors_and_changes_nothing(tmp_path: Path) -> None:
    savepoint.CheckpointManager(tmp_path).save(1, model=BUILDERS["mixtral"]())
    other = type(BUILDERS["mixtral"]())(
        BUILDERS["mixtral"]().config.__class__(
            **{**BUILDERS["mixtral"]().config.to_dict(), "num_local_experts": 3}
        )
    )
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(IncompatibleCheckpointError, match=r"experts\.3\.w1\.weight"):
        savepoint.CheckpointManager(tmp_path).restore(model=other, step=1)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_bf16_save_casts_after_conversion(tmp_path: Path) -> None:
    model = BUILDERS["olmoe"]()
    ours = savepoint.save_pretrained(model, tmp_path / "ours", dtype="bf16", max_shard_size=SHARD)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "theirs", max_shard_size=SHARD)
    assert_same_weights(ours, tmp_path / "theirs")


PEAK_SCRIPT = """
import resource, sys, tempfile, torch, transformers
import savepoint
config = transformers.MixtralConfig(vocab_size=128, hidden_size=128, intermediate_size=1024, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2)
def save(model, out):
    if sys.argv[1] == "savepoint":
        savepoint.save_pretrained(model, out, max_shard_size="4MB")
    else:
        model.save_pretrained(out, max_shard_size="4MB")
small = transformers.MixtralForCausalLM(transformers.MixtralConfig(vocab_size=16, hidden_size=8,
    intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, num_local_experts=2))
model = transformers.MixtralForCausalLM(config)
with tempfile.TemporaryDirectory() as tmp:
    save(small, tmp + "/warm-up")  # imports and first-call allocations are not the save's memory
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    save(model, tmp + "/out")
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
print(grown / sum(p.numel() * p.element_size() for p in model.parameters()))
"""


def test_conversion_streams_without_a_second_copy_of_the_model() -> None:
    # 50 MB of Mixtral, 95% of it experts, in 4 MB shards. Converting the whole model at once (as
    # transformers does) makes new tensors for every expert's gate and up halves: 2/3 of the model.
    # Group by group, the peak grows by a layer's experts and a shard.
    def growth(writer: str) -> float:
        done = subprocess.run(
            [sys.executable, "-c", PEAK_SCRIPT, writer],
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        )
        return float(done.stdout.strip().splitlines()[-1])

    ours = growth("savepoint")
    assert ours < 0.4, f"peak memory grew by {ours:.2f}x the model's size during the save"


@pytest.mark.slow
def test_fsdp2_checkpoint_of_a_moe_model_has_hub_layout_and_resumes_exactly(tmp_path: Path) -> None:
    from tests.distributed.common import REPO, worker_env

    subprocess_args = [
        str(Path(sys.executable).with_name("torchrun")),
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "tests" / "formats" / "worker_moe_fsdp2.py"),
        str(tmp_path),
    ]
    done = subprocess.run(subprocess_args, env=worker_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-6000:]
    for rank, losses in enumerate(json.loads((tmp_path / "result.json").read_text())):
        assert losses["again"] == losses["first"], f"rank {rank} diverged after restore"
    names = [k for t in weight_files(tmp_path / "run" / "step-00000002").values() for k in t]
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in names
    assert not any(k.endswith("gate_up_proj") for k in names)
    config = json.loads((tmp_path / "run" / "step-00000002" / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]  # not fully_shard's FSDPMixtralForCausalLM
    # The sharded-weights checkpoint consolidates into the same Hub layout, shards and bytes.
    from savepoint.consolidate import consolidate

    out = consolidate(tmp_path / "sharded" / "step-00000002", tmp_path / "consolidated")
    assert_same_weights(out, tmp_path / "run" / "step-00000002")
    # async_save=True under torchrun: a sharded model's and a DDP model's background
    # write both come out in the Hub layout, as transformers saves them.
    assert_same_weights(tmp_path / "async_fsdp2" / "step-00000002", tmp_path / "run" / "step-00000002")
    assert_same_weights(tmp_path / "async_ddp" / "step-00000001", tmp_path / "ddp_reference")


# More architectures transformers converts, from their own configs shrunk to a few KB (GPT-OSS keeps
# its fused layout on the Hub too: nothing to convert, which must also come out identical).
MORE = [
    "DeepseekV2",
    "Ernie4_5_Moe",
    "Glm4Moe",
    "Glm4MoeLite",
    "GptOss",
    "HunYuanMoEV1",
    "Jamba",
    "MiniMax",
    "Qwen2Moe",
    "Qwen3Next",
    "SolarOpen",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", MORE)
def test_more_architectures_save_like_transformers_and_restore(name: str, tmp_path: Path) -> None:
    import transformers
    from tests.helpers.converted_models import MOE_CONFIG, TEXT_CONFIG

    config_cls = getattr(transformers, f"{name}Config")
    known = set(config_cls().to_dict())
    extra = {"num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "head_dim": 8, **MOE_CONFIG}
    config = config_cls(**TEXT_CONFIG, **{k: v for k, v in extra.items() if k in known})
    model_cls = getattr(transformers, f"{name}ForCausalLM")
    torch.manual_seed(0)
    model = model_cls(config).eval()
    ours = savepoint.save_pretrained(model, tmp_path / "ours", max_shard_size=SHARD)
    model.save_pretrained(tmp_path / "theirs", max_shard_size=SHARD)
    assert_same_weights(ours, tmp_path / "theirs")
    savepoint.CheckpointManager(tmp_path / "run").save(1, model=model)
    torch.manual_seed(1)
    fresh = model_cls(config)
    savepoint.CheckpointManager(tmp_path / "run").restore(model=fresh)
    for (key, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
