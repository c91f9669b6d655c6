"""A DeepSpeed ZeRO-3 checkpoint of a Mixtral (experts fused in memory) is in the Hub's layout, and
`savepoint consolidate` of the engine's own files writes it too: the files, index and tensors
transformers' own `save_pretrained` writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.distributed.common import torchrun
from tests.helpers.converted_models import logits, sample_ids

import savepoint
from savepoint.consolidate import consolidate

pytestmark = pytest.mark.slow
os.environ.setdefault("DS_ACCELERATOR", "cpu")
pytest.importorskip("deepspeed")
SHARD = "24KB"  # as the worker's save_pretrained: several shards and an index


def weights(model_dir: Path) -> dict:
    out = {}
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors"):
            out.update(load_file(model_dir / name))
    return out


def test_consolidated_moe_engine_checkpoint_is_what_save_pretrained_writes(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    torchrun("worker_moe_deepspeed.py", str(tmp_path))
    theirs = tmp_path / "theirs"
    source = tmp_path / "run" / "step-00000001" / "train_state" / "deepspeed"

    ours = Path(consolidate(source, tmp_path / "ours", max_shard_size=SHARD))

    def files(d: Path) -> list[str]:
        return sorted(n for n in os.listdir(d) if n.endswith((".safetensors", ".index.json")))

    assert files(ours) == files(theirs) and len(files(theirs)) > 2
    index = "model.safetensors.index.json"
    assert json.loads((ours / index).read_text()) == json.loads((theirs / index).read_text())
    expected, got = weights(theirs), weights(ours)
    assert any(".experts.0." in n for n in expected)  # the Hub's per-expert tensors, not the fused ones
    assert {n: t.shape for n, t in got.items()} == {n: t.shape for n, t in expected.items()}
    # fp32 training: the fp32 master weights DeepSpeed keeps are the module's weights
    for name, tensor in expected.items():
        assert got[name].equal(tensor), name
    # The checkpoint's own weights (ZeRO-3 gathered to rank 0 at save time) are in the same layout.
    saved = weights(tmp_path / "run" / "step-00000001")
    assert {n: t.shape for n, t in saved.items()} == {n: t.shape for n, t in expected.items()}
    assert all(saved[name].equal(tensor) for name, tensor in expected.items())
    reference = logits(AutoModelForCausalLM.from_pretrained(theirs), sample_ids())
    assert logits(AutoModelForCausalLM.from_pretrained(ours), sample_ids()).equal(reference)
    savepoint.verify(ours)

    # Cast on the way out: the same shards transformers writes for the model cast to bf16.
    AutoModelForCausalLM.from_pretrained(theirs, dtype=torch.bfloat16).save_pretrained(
        tmp_path / "theirs-bf16", max_shard_size=SHARD
    )
    cast = Path(consolidate(source, tmp_path / "ours-bf16", max_shard_size=SHARD, dtype="bf16"))
    assert json.loads((cast / index).read_text()) == json.loads(
        (tmp_path / "theirs-bf16" / index).read_text()
    )
    got = weights(cast)
    for name, tensor in weights(tmp_path / "theirs-bf16").items():
        assert got[name].equal(tensor), name
