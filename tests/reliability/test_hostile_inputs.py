"""Hostile checkpoints: files crafted to run code, escape the directory, exhaust memory or mislead.

Each class plants one hazard in a real checkpoint (a consistent attacker also rewrites the manifest
so that checksums match) and asserts the outcome a user must get: a `SavepointError` that names the
file, no code run, no byte read outside, and the model left untouched.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
import struct
import time
import warnings
from pathlib import Path

import pytest
import torch
from tests.reliability.scenarios import train_state

import savepoint
from savepoint.discovery import list_checkpoints
from savepoint.errors import (
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    SavepointError,
    UnsafeCheckpointError,
)
from savepoint.manifest import hash_entry, parse_manifest, read_manifest
from savepoint.pipeline.restore_entry import restore_checkpoint

SENTINEL = "pwned"


class Bomb:
    """Unpickling this creates a file: proof that someone unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.path, "w"))


def plant_pickle(path: str, sentinel: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(Bomb(sentinel), f)


def relist(ckpt: str, *, drop: tuple[str, ...] = (), **changes: object) -> None:
    """Rewrite the manifest to vouch for the files as they are now (a consistent attacker)."""
    doc = json.loads(Path(ckpt, "savepoint.json").read_bytes())
    files = {}
    for dirpath, _d, names in os.walk(ckpt):
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), ckpt)
            if rel != "savepoint.json" and rel not in drop:
                e = hash_entry(os.path.join(dirpath, n))
                files[rel] = {"size": e.size, "checksum": e.checksum}
    doc["files"] = files
    doc.update(changes)
    with open(os.path.join(ckpt, "savepoint.json"), "w") as f:
        json.dump(doc, f)


@pytest.fixture
def run(tmp_path) -> str:
    """A root with one committed train-state checkpoint (step 1)."""
    root = str(tmp_path / "run")
    state = train_state(1)
    with savepoint.CheckpointManager(root) as mgr:
        mgr.save(1, model=state.model, **state.kwargs)
    return root


def ckpt_of(root: str) -> str:
    return os.path.join(root, "step-00000001")


def restore_into_fresh(root: str, step: int | str = 1) -> torch.nn.Module:
    """Restore and insist the model is untouched if it fails."""
    fresh = train_state(1, fresh=True)
    before = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    kwargs = {k: fresh.kwargs[k] for k in ("optimizer", "scheduler", "stateful")}
    try:
        savepoint.CheckpointManager(root).restore(model=fresh.model, step=step, **kwargs)
    except SavepointError:
        after = fresh.model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), "a failed restore changed the model"
        raise
    return fresh.model


# ---------------------------------------------------------------- 1. pickles


@pytest.mark.parametrize(
    "where", ["pytorch_model.bin", "train_state/optimizer.pt", "train_state/rng/rank-00000.pkl"]
)
@pytest.mark.parametrize("listed", [False, True])
def test_planted_pickle_is_never_loaded(run: str, tmp_path, where: str, listed: bool) -> None:
    sentinel = str(tmp_path / SENTINEL)
    plant_pickle(os.path.join(ckpt_of(run), where), sentinel)
    if listed:
        relist(ckpt_of(run))
    else:
        with pytest.raises(CorruptCheckpointError, match=r"not listed"):
            savepoint.verify(run)
    restore_into_fresh(run)
    restore_into_fresh(run, "latest")
    assert not os.path.exists(sentinel), "a planted pickle was unpickled"


def test_pickle_only_base_model_is_refused(tmp_path) -> None:
    pytest.importorskip("savepoint.lora.merge")
    sentinel = str(tmp_path / SENTINEL)
    base = tmp_path / "base"
    plant_pickle(str(base / "pytorch_model.bin"), sentinel)
    (base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    with pytest.raises(SavepointError, match=r"pickle"):
        savepoint.merge_lora(str(adapter), base=str(base), out=str(tmp_path / "out"))
    assert not os.path.exists(sentinel)


# ---------------------------------------------------------------- 2. paths that climb out


@pytest.mark.parametrize("bad", ["../outside.bin", "/etc/passwd", "train_state/../../x", "a//b", "C:\\x"])
def test_manifest_paths_that_leave_are_refused(run: str, bad: str) -> None:
    doc = json.loads(Path(ckpt_of(run), "savepoint.json").read_bytes())
    doc["files"][bad] = {"size": 1, "checksum": "0" * 32}
    with pytest.raises(UnsafeCheckpointError):
        parse_manifest(json.dumps(doc).encode(), ckpt_of(run))


@pytest.mark.parametrize("bad", ["../outside.safetensors", "/etc/hostname", "sub/../../x.safetensors"])
def test_index_paths_that_leave_are_refused(tmp_path, bad: str) -> None:
    model = train_state(1).model
    out = str(tmp_path / "export")
    savepoint.save_pretrained(model, out, max_shard_size=100)
    index = os.path.join(out, "model.safetensors.index.json")
    doc = json.loads(Path(index).read_bytes())
    doc["weight_map"][next(iter(doc["weight_map"]))] = bad
    Path(index).write_text(json.dumps(doc))
    relist(out)
    with pytest.raises(UnsafeCheckpointError):
        restore_checkpoint(out, model=train_state(1, fresh=True).model)


# ---------------------------------------------------------------- 3. symlinks


@pytest.mark.parametrize("what", ["model.safetensors", "train_state", "savepoint.json"])
def test_symlinks_out_are_refused(run: str, tmp_path, what: str) -> None:
    target = str(tmp_path / "elsewhere")
    src = os.path.join(ckpt_of(run), what)
    shutil.move(src, target)  # identical bytes, just outside: only the link itself is wrong
    os.symlink(target, src)
    with pytest.raises(CorruptCheckpointError):
        savepoint.verify(ckpt_of(run))
    with pytest.raises(SavepointError):
        restore_into_fresh(run)


# ---------------------------------------------------------------- 4. huge claimed sizes


@pytest.mark.parametrize("claimed", [2**63, 4 * 2**30, 2**64 - 1])
def test_safetensors_header_claiming_a_huge_length(run: str, claimed: int) -> None:
    from savepoint.formats.safetensors_io import read_header, read_safetensors

    path = os.path.join(ckpt_of(run), "model.safetensors")
    with open(path, "r+b") as f:
        f.write(struct.pack("<Q", claimed))
    relist(ckpt_of(run))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    for read in (read_header, read_safetensors):
        with pytest.raises(CorruptCheckpointError, match=r"model.safetensors"):
            read(path, checkpoint=ckpt_of(run), relpath="model.safetensors")
    with pytest.raises(CorruptCheckpointError):
        restore_into_fresh(run)
    grew_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024
    assert grew_mib < 256 and time.monotonic() - start < 10, "memory or time followed the claimed size"


def test_tensor_claiming_a_huge_shape(run: str) -> None:
    path = os.path.join(ckpt_of(run), "model.safetensors")
    header = {"0.weight": {"dtype": "F32", "shape": [2**31, 2**31], "data_offsets": [0, 16]}}
    raw = json.dumps(header).encode()
    Path(path).write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 16)
    relist(ckpt_of(run))
    with pytest.raises(SavepointError):
        restore_into_fresh(run)


# ---------------------------------------------------------------- 5. shapes and dtypes that disagree


def _rewrite_weights(ckpt: str, change) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import load_file, save_file

    path = os.path.join(ckpt, "model.safetensors")
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    relist(ckpt)


@pytest.mark.parametrize(
    "change",
    [
        lambda t: t.update({"0.weight": torch.zeros(3, 3)}),
        lambda t: t.update({"0.weight": t["0.weight"].to(torch.int32)}),
        lambda t: t.update({"0.weight": t["0.weight"].to(torch.float16)}),
        lambda t: t.pop("2.bias"),
        lambda t: t.update({"extra": torch.zeros(1)}),
    ],
    ids=["shape", "int-dtype", "half-dtype", "missing-key", "unexpected-key"],
)
def test_weights_that_disagree_with_the_model(run: str, change) -> None:  # type: ignore[no-untyped-def]
    _rewrite_weights(ckpt_of(run), change)
    with pytest.raises(IncompatibleCheckpointError, match=r"0.weight|2.bias|extra"):
        restore_into_fresh(run)


def test_header_shape_disagreeing_with_its_bytes(run: str) -> None:
    path = os.path.join(ckpt_of(run), "model.safetensors")
    header = {"0.weight": {"dtype": "F32", "shape": [8, 4], "data_offsets": [0, 16]}}
    raw = json.dumps(header).encode()
    Path(path).write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 16)
    relist(ckpt_of(run))
    with pytest.raises(CorruptCheckpointError, match=r"model.safetensors"):
        restore_into_fresh(run)


# ---------------------------------------------------------------- 6. duplicate keys


def test_duplicate_keys_in_the_manifest(run: str) -> None:
    raw = Path(ckpt_of(run), "savepoint.json").read_bytes()
    # A second "format_version" after the first: parsers that keep the first and those that keep the
    # last would disagree about this file, so savepoint must refuse it.
    raw = raw.replace(b'"format_version": 1,', b'"format_version": 1, "format_version": 99,', 1)
    with pytest.raises(CorruptCheckpointError, match=r"duplicate"):
        parse_manifest(raw, ckpt_of(run))


def test_duplicate_tensor_names_in_a_safetensors_header(run: str) -> None:
    path = os.path.join(ckpt_of(run), "model.safetensors")
    entry = '{"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}'
    raw = ('{"0.bias": ' + entry + ', "0.bias": ' + entry + "}").encode()
    raw += b" " * (-len(raw) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 8)
    relist(ckpt_of(run))
    with pytest.raises(SavepointError):
        restore_into_fresh(run)


def test_tensor_in_two_shards_is_refused(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    out = str(tmp_path / "export")
    savepoint.save_pretrained(train_state(1).model, out, max_shard_size=100)
    shards = sorted(n for n in os.listdir(out) if n.startswith("model-"))
    first = load_file(os.path.join(out, shards[0]))
    second = load_file(os.path.join(out, shards[1]))
    second.update({k: torch.full_like(v, 7.0) for k, v in first.items()})
    save_file(second, os.path.join(out, shards[1]), metadata={"format": "pt"})
    relist(out)
    with pytest.raises(CorruptCheckpointError):
        restore_checkpoint(out, model=train_state(1, fresh=True).model)


# ---------------------------------------------------------------- 7. listed-but-missing, present-but-unlisted


def test_listed_files_missing_and_unlisted_files_present(run: str) -> None:
    ckpt = ckpt_of(run)
    os.remove(os.path.join(ckpt, "train_state", "scheduler.json"))
    Path(os.path.join(ckpt, "notes.txt")).write_text("planted")
    with pytest.raises(CorruptCheckpointError) as err:
        savepoint.verify(ckpt)
    assert "scheduler.json: missing" in str(err.value) and "notes.txt: present but not listed" in str(
        err.value
    )
    with pytest.raises(CorruptCheckpointError, match=r"scheduler.json"):
        restore_into_fresh(run)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert savepoint.CheckpointManager(run).restore(model=train_state(1, fresh=True).model).step == 0


# ---------------------------------------------------------------- 8-9. LoRA: NaN merges, another base


def _lora_checkpoint(tmp_path, poison: float | None = None) -> tuple[str, str]:
    pytest.importorskip("savepoint.formats.peft")
    from tests.reliability.scenarios import lora_state, tiny_llama

    base = str(tmp_path / "base")
    tiny_llama().save_pretrained(base)
    state = lora_state(1)
    if poison is not None:
        with torch.no_grad():
            next(p for n, p in state.model.named_parameters() if "lora_B" in n).view(-1)[0] = poison
    root = str(tmp_path / "lora")
    with savepoint.CheckpointManager(root) as mgr:
        mgr.save(1, model=state.model, **state.kwargs)
    return os.path.join(root, "step-00000001"), base


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_non_finite_adapter_refuses_to_merge(tmp_path, poison: float) -> None:
    ckpt, base = _lora_checkpoint(tmp_path, poison)
    out = str(tmp_path / "merged")
    with pytest.raises(savepoint.MergeError, match=r"(?i)nan|inf|finite"):
        savepoint.merge_lora(ckpt, base=base, out=out)
    assert not os.path.exists(out)


def test_adapter_for_another_base(tmp_path) -> None:
    ckpt, _ = _lora_checkpoint(tmp_path)
    from tests.reliability.scenarios import fill_, lora_state, tiny_llama

    other = tiny_llama(seed=5)
    fill_(other, 99)
    other_dir = str(tmp_path / "other")
    other.save_pretrained(other_dir)
    with pytest.raises(SavepointError, match=r"(?i)base"):
        savepoint.merge_lora(ckpt, base=other_dir, out=str(tmp_path / "merged"))
    model = lora_state(1, fresh=True).model
    fill_(model.get_base_model(), 99)
    with pytest.raises(IncompatibleCheckpointError, match=r"(?i)base"):
        restore_checkpoint(ckpt, model=model)


# ---------------------------------------------------------------- 10. a newer format


def test_checkpoint_from_a_newer_format_version(run: str) -> None:
    relist(ckpt_of(run), format_version=2)
    with pytest.raises(IncompatibleCheckpointError, match=r"upgrade savepoint"):
        read_manifest(ckpt_of(run))
    with pytest.warns(UserWarning, match=r"newer"):
        assert list_checkpoints(run) == []
    with pytest.raises(IncompatibleCheckpointError, match=r"upgrade savepoint"):
        restore_into_fresh(run)


# ---------------------------------------------------------------- 11. special files (no hang)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("what", ["savepoint.json", "model.safetensors", "train_state/optimizer.json"])
def test_fifo_in_place_of_a_file_does_not_hang(run: str, what: str) -> None:
    path = os.path.join(ckpt_of(run), what)
    os.remove(path)
    os.mkfifo(path)  # opening a FIFO for reading blocks until a writer comes: forever
    with pytest.raises(CorruptCheckpointError, match=r"regular file|missing"):
        savepoint.verify(ckpt_of(run))
    with pytest.raises(CorruptCheckpointError):
        restore_into_fresh(run)


# ---------------------------------------------------------------- 12. a manifest that lies about its step


def test_manifest_step_disagreeing_with_its_directory(run: str) -> None:
    relist(ckpt_of(run), step=7)
    with pytest.warns(UserWarning, match=r"step 7"):
        assert list_checkpoints(run) == []
