"""A base model in the Hugging Face cache layout (snapshot files are links into `../../blobs/`) merges.

Links are refused everywhere else (issue: foreign checkpoints); the cache's own shape is the one
exception, and it is followed only into that repo folder's `blobs/` directory.
"""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file
from tests.helpers.lora_models import make_adapter, save_base

from savepoint.errors import SavepointError
from savepoint.lora import merge_lora

REVISION = "0123456789abcdef0123456789abcdef01234567"


def as_hub_cache(plain: str, cache: str) -> str:
    """Lay `plain` out as the hub cache does; return the snapshot directory."""
    repo = os.path.join(cache, "models--tiny--llama")
    blobs, snapshot = os.path.join(repo, "blobs"), os.path.join(repo, "snapshots", REVISION)
    os.makedirs(blobs)
    os.makedirs(snapshot)
    for name in os.listdir(plain):
        with open(os.path.join(plain, name), "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        shutil.copyfile(os.path.join(plain, name), os.path.join(blobs, digest))
        os.symlink(f"../../blobs/{digest}", os.path.join(snapshot, name))
    return snapshot


def merged_tensors(out: str) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(out)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(out, name)))
    return tensors


def test_base_in_the_hub_cache_layout_merges_like_a_plain_directory(tmp_path) -> None:
    plain = save_base("llama", str(tmp_path / "plain"))
    snapshot = as_hub_cache(plain, str(tmp_path / "cache"))
    make_adapter("llama", plain, str(tmp_path / "adapter"), target_modules=["q_proj", "v_proj"])

    merge_lora(str(tmp_path / "adapter"), base=plain, out=str(tmp_path / "from-plain"))
    merge_lora(str(tmp_path / "adapter"), base=snapshot, out=str(tmp_path / "from-cache"))

    a, b = merged_tensors(str(tmp_path / "from-plain")), merged_tensors(str(tmp_path / "from-cache"))
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("target", ["/etc/hostname", "../../../../outside", "../../blobs/../../../outside"])
def test_other_links_in_a_cache_snapshot_are_refused(tmp_path, target: str) -> None:
    plain = save_base("llama", str(tmp_path / "plain"))
    snapshot = as_hub_cache(plain, str(tmp_path / "cache"))
    make_adapter("llama", plain, str(tmp_path / "adapter"), target_modules=["q_proj"])
    (tmp_path / "outside").write_text("{}")
    os.unlink(os.path.join(snapshot, "config.json"))
    os.symlink(target, os.path.join(snapshot, "config.json"))

    with pytest.raises(SavepointError, match=r"config\.json"):
        merge_lora(str(tmp_path / "adapter"), base=snapshot, out=str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out") or not os.listdir(tmp_path / "out")
