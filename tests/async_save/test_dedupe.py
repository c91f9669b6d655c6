"""Hard-link dedupe: files unchanged since the parent checkpoint are linked, changed ones written."""

from __future__ import annotations

import json
import os

import pytest
import torch

import savepoint
from savepoint.formats.hf import write_weights
from savepoint.formats.safetensors_io import write_safetensors
from savepoint.manifest import build_manifest
from savepoint.storage import dedupe
from savepoint.storage.dedupe import DedupingStagedDir
from savepoint.storage.local import StagedDir


def commit(staged: StagedDir) -> str:
    return staged.commit(build_manifest("module", staged.entries, step=0).to_json())


def half_frozen_state(step: int) -> dict[str, torch.Tensor]:
    """Layers 0-1 frozen (same every save), layers 2-3 trained (different every save)."""
    gen = torch.Generator().manual_seed(0)
    frozen = {f"layers.{i}.weight": torch.randn(64, 64, generator=gen) for i in range(2)}
    trained = {f"layers.{i}.weight": torch.full((64, 64), float(step)) for i in range(2, 4)}
    return frozen | trained


def save(root: str, name: str, step: int, previous: str | None) -> DedupingStagedDir:
    staged = DedupingStagedDir(root, name, previous=previous)
    # 16 KiB shards: each 64x64 fp32 layer in its own file, as frozen layers in their own shard would be.
    write_weights(half_frozen_state(step), staged, max_shard_size="16KB")
    staged.write_bytes("tokenizer.json", b'{"vocab": {"a": 0}}')
    commit(staged)
    return staged


def test_second_save_links_unchanged_shards_and_writes_the_rest(tmp_path):
    root = str(tmp_path)
    first = save(root, "step-1", 1, previous=None)
    assert first.linked == {}
    second = save(root, "step-2", 2, previous="step-1")
    shard_bytes = {rel: size for rel, (size, _) in second.entries.items() if rel.endswith(".safetensors")}
    assert len(shard_bytes) == 4
    linked_shards = {rel for rel in second.linked if rel.endswith(".safetensors")}
    assert len(linked_shards) == 2, second.linked
    written = sum(size for rel, (size, _) in second.entries.items() if rel not in second.linked)
    assert written < 0.55 * sum(size for size, _ in second.entries.values())
    for rel in second.linked:
        a, b = os.stat(os.path.join(root, "step-1", rel)), os.stat(os.path.join(root, "step-2", rel))
        assert a.st_ino == b.st_ino and b.st_nlink == 2
    assert savepoint.verify(os.path.join(root, "step-2"))
    with open(os.path.join(root, "step-2", "savepoint.json")) as f:
        listed = json.load(f)["files"]
    assert {rel: e["checksum"] for rel, e in listed.items()} == {
        rel: c for rel, (_, c) in second.entries.items()
    }


def test_deleting_the_parent_keeps_the_linked_files(tmp_path):
    root = str(tmp_path)
    save(root, "step-1", 1, previous=None)
    save(root, "step-2", 2, previous="step-1")
    savepoint.storage.local.delete_checkpoint_dir(os.path.join(root, "step-1"))
    assert savepoint.verify(os.path.join(root, "step-2"))


@pytest.mark.parametrize(
    "new",
    [b"hello world, changed at the end!", b"hello world", b"hello world, and then some more bytes", b"Hello"],
    ids=["same-size-differs-late", "prefix-of-parent", "parent-is-prefix", "differs-at-once"],
)
def test_a_file_that_differs_anywhere_is_written_whole(tmp_path, new):
    root = str(tmp_path)
    parent = StagedDir(root, "step-1")
    parent.write_bytes("f.bin", b"hello world, changed at the start")
    commit(parent)
    staged = DedupingStagedDir(root, "step-2", previous="step-1")
    with staged.create("f.bin") as out:
        for start in range(0, len(new), 5):  # several writes, so the divergence lands mid-stream
            out.write(new[start : start + 5])
    assert staged.linked == {}
    with open(staged.abspath("f.bin"), "rb") as f:
        assert f.read() == new
    assert os.stat(staged.abspath("f.bin")).st_nlink == 1


def test_files_written_by_other_libraries_are_linked_too(tmp_path):
    root = str(tmp_path)
    for name, previous in [("step-1", None), ("step-2", "step-1")]:
        staged = DedupingStagedDir(root, name, previous=previous)
        with open(staged.abspath("tokenizer_config.json"), "w") as f:
            f.write('{"model_max_length": 128}')
        staged.record_unlisted()
        commit(staged)
    assert staged.linked == {"tokenizer_config.json": 25}
    assert os.stat(os.path.join(root, "step-2", "tokenizer_config.json")).st_nlink == 2


def test_without_hard_links_the_file_is_copied(tmp_path, monkeypatch):
    root = str(tmp_path)
    save(root, "step-1", 1, previous=None)

    def no_links(*_a: object, **_k: object) -> None:
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(dedupe.os, "link", no_links)
    second = save(root, "step-2", 1, previous="step-1")
    assert second.linked == {}
    assert savepoint.verify(os.path.join(root, "step-2"))


def test_an_uncommitted_parent_is_never_linked_into(tmp_path):
    staged = DedupingStagedDir(str(tmp_path), "step-2", previous=".tmp-step-1-abcd")
    assert staged.previous is None
    with staged.create("x.safetensors") as out:
        write_safetensors(out, {"a": torch.ones(2)})
    assert staged.linked == {}


def test_manager_links_what_did_not_change_between_saves(tmp_path):
    model = torch.nn.Linear(256, 256)
    with savepoint.CheckpointManager(tmp_path / "run") as mgr:
        first = mgr.save(1, model=model)
        second = mgr.save(2, model=model)
    a = os.stat(os.path.join(first, "model.safetensors"))
    b = os.stat(os.path.join(second, "model.safetensors"))
    assert a.st_ino == b.st_ino
    assert savepoint.verify(second) == [second]
