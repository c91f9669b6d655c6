"""Hostile checkpoints against the rewritten save and restore paths.

The restore now reads each file once and checks it in that read (`verified_read`), DCP items against
per-rank records of their checksums (`formats/dcp_ranges.py`); a rank restoring from an object store
downloads only its part (`storage/remote_restore.rank_copy`); `async_save="process"` hands saves to a
writer process that dedupes against the previous checkpoint and applies retention. Each class plants
its hazard as an attacker would (every checksum recomputed) and checks that nothing runs, nothing
outside is touched, and nothing unverified changes a live object.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.reliability.harness import FULL
from tests.reliability.hostile_helpers import SECRET, cli_ok, save_steps, step_path
from tests.reliability.scenarios import train_state
from tests.reliability.test_hostile_formats import DCP, METADATA, attempt_restore, make_sharded
from tests.reliability.test_hostile_inputs import SENTINEL, Bomb, ckpt_of, relist

import savepoint
from savepoint._hashing import new_hasher
from savepoint.errors import CorruptCheckpointError, SavepointError, UnsafeCheckpointError
from savepoint.formats.dcp_ranges import record_name

# ---------------------------------------------------------------- DCP item records


def _items(ckpt: str) -> dict[str, list[list[Any]]]:
    """Every stored item of the DCP directory, by data file: [offset, length, checksum] (the test
    reads its own `.metadata` with pickle, as an attacker's tool would)."""
    metadata = pickle.loads(Path(ckpt, METADATA).read_bytes())
    files: dict[str, list[list[Any]]] = {}
    for entry in metadata.storage_data.values():
        data = Path(ckpt, DCP, entry.relative_path).read_bytes()[entry.offset : entry.offset + entry.length]
        hasher = new_hasher()
        hasher.update(data)
        files.setdefault(entry.relative_path, []).append([entry.offset, entry.length, hasher.hexdigest()])
    return {name: sorted(spans) for name, spans in files.items()}


def _write_record(ckpt: str, files: Any, *, raw: str | None = None) -> None:
    path = Path(ckpt, record_name(0))
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format": "savepoint-dcp-ranges", "checksum_algorithm": "xxh3-128", "files": files}
    path.write_text(raw if raw is not None else json.dumps(doc))
    relist(ckpt)


def make_recorded(root: str) -> str:
    """Step 1 of `root` as a sharded checkpoint with per-item checksum records, as ranks write them."""
    ckpt = make_sharded(root)
    _write_record(ckpt, _items(ckpt))
    return ckpt


def _first(files: dict[str, list[list[Any]]]) -> tuple[str, list[list[Any]]]:
    name = sorted(files)[0]
    return name, files[name]


def _infinity(ckpt: str, files: dict) -> None:
    _, spans = _first(files)
    text = json.dumps({"format": "savepoint-dcp-ranges", "files": files})
    first = json.dumps(spans[0])
    _write_record(ckpt, None, raw=text.replace(first, f'[Infinity, {spans[0][1]}, "{spans[0][2]}"]', 1))


def _float_offset(ckpt: str, files: dict) -> None:
    _, spans = _first(files)
    spans[0][0] = spans[0][0] + 0.5
    _write_record(ckpt, files)


def _past_the_file(ckpt: str, files: dict) -> None:
    _, spans = _first(files)
    spans[-1][1] += 2**40  # a length far past the data file: memory must not follow it
    _write_record(ckpt, files)


def _overlap(ckpt: str, files: dict) -> None:
    _, spans = _first(files)
    spans.append([spans[0][0] + 1, spans[0][1], spans[0][2]])
    _write_record(ckpt, files)


def _gap(ckpt: str, files: dict) -> None:
    _, spans = _first(files)
    del spans[0]  # bytes DCP reads that no record vouches for
    _write_record(ckpt, files)


def _swapped_digests(ckpt: str, files: dict) -> None:
    _, spans = _first(files)
    spans[0][2], spans[1][2] = spans[1][2], spans[0][2]
    _write_record(ckpt, files)


def _not_a_record(ckpt: str, files: dict) -> None:
    _write_record(ckpt, {"__0_0.distcp": "0,10,abc"})


def _unknown_file(ckpt: str, files: dict) -> None:
    _write_record(ckpt, {"__0_0.distcp.elsewhere": next(iter(files.values()))})


def _huge_record(ckpt: str, files: dict) -> None:
    _write_record(ckpt, files)
    with open(Path(ckpt, record_name(0)), "r+b") as f:
        f.truncate(200 * 2**20)  # sparse: 200 MiB claimed, past the cap; the manifest vouches for it
    relist(ckpt)


RECORD_ATTACKS = {
    "infinity": _infinity,
    "float-offset": _float_offset,
    "past-the-file": _past_the_file,
    "overlap": _overlap,
    "gap": _gap,
    "swapped-digests": _swapped_digests,
    "not-a-record": _not_a_record,
    "record-of-another-file": _unknown_file,
    "huge-record": _huge_record,
}


def test_dcp_item_records_control(run: str) -> None:
    """The control: recorded items restore (so the attacks below reach the item-checked reader)."""
    make_recorded(run)
    fresh = train_state(1, fresh=True)
    kwargs = {k: fresh.kwargs[k] for k in ("optimizer", "scheduler", "stateful")}
    savepoint.CheckpointManager(run).restore(model=fresh.model, step=1, **kwargs)
    expected = train_state(1)
    for key, value in expected.model.state_dict().items():
        assert torch.equal(fresh.model.state_dict()[key], value), key


@pytest.mark.parametrize("attack", sorted(RECORD_ATTACKS))
def test_dcp_item_records_forged(run: str, attack: str) -> None:
    """A forged record of item checksums (manifest recomputed): refused by name, nothing changes, and
    memory never follows a length the record claims."""
    ckpt = make_recorded(run)
    RECORD_ATTACKS[attack](ckpt, _items(ckpt))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    error, changed = attempt_restore(run)
    grew_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024
    assert isinstance(error, CorruptCheckpointError), f"{attack}: {type(error).__name__}: {error}"
    assert changed == [], f"{attack}: a failed restore ({error}) changed {changed}"
    assert "dcp_ranges/rank-00000.json" in str(error) or ".distcp" in str(error), error
    assert attack != "huge-record" or "more than the" in str(error), error
    assert grew_mib < 256, f"{attack}: memory grew {grew_mib:.0f} MiB"


def test_dcp_item_holds_a_pickle_bomb(run: str, tmp_path: Path) -> None:
    """A tensor record replaced by a torch pickle that runs code, its item checksum recomputed: the
    record vouches for the bytes, DCP still decodes them with the weights-only unpickler."""
    import io

    sentinel = str(tmp_path / SENTINEL)
    ckpt = make_recorded(run)
    buf = io.BytesIO()
    torch.save(Bomb(sentinel), buf)
    bomb = buf.getvalue()
    metadata = pickle.loads(Path(ckpt, METADATA).read_bytes())
    entry = next(e for i, e in metadata.storage_data.items() if i.fqn.startswith("model."))
    data = Path(ckpt, DCP, entry.relative_path)
    raw = bytearray(data.read_bytes())
    raw[entry.offset : entry.offset + min(len(bomb), entry.length)] = bomb[: entry.length]
    data.write_bytes(bytes(raw))
    _write_record(ckpt, _items(ckpt))
    error, changed = attempt_restore(run)
    assert isinstance(error, CorruptCheckpointError) and changed == [], error
    assert not os.path.exists(sentinel), "a DCP item was unpickled"


# ---------------------------------------------------------------- train-state JSON caps


@pytest.mark.parametrize(
    "blob", ["scheduler", "rng/rank-00000", "stateful/loader"] if FULL else ["scheduler"]
)
def test_train_state_json_over_its_cap(run: str, blob: str) -> None:
    """A state document the manifest vouches for at 300 MiB (sparse), past the 256 MiB a save may write:
    refused before any byte is read."""
    ckpt = ckpt_of(run)
    with open(Path(ckpt, f"train_state/{blob}.json"), "r+b") as f:
        f.truncate(300 * 2**20)
    relist(ckpt)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    error, changed = attempt_restore(run)
    grew_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024
    assert isinstance(error, CorruptCheckpointError) and changed == [], error
    assert f"{blob}.json" in str(error) and "more than the" in str(error), error
    assert grew_mib < 256 and time.monotonic() - start < 20, "memory or time followed the claimed size"


# ---------------------------------------------------------------- object stores: one rank's download


def _remote_with_listed(tmp_path: Path, bad: str) -> tuple[Any, str, Path]:
    """A memory:// root whose step 1 manifest lists `bad` too (its object planted, checksum recomputed)."""
    from savepoint.storage.remote import RemoteRoot

    url = f"memory://hostile-{os.getpid()}-{time.monotonic_ns()}/run"
    save_steps(url, (1,))
    remote = RemoteRoot(url)
    key = f"{remote.path}/step-00000001/savepoint.json"
    doc = json.loads(remote.fs.cat_file(key))
    hasher = new_hasher()
    hasher.update(SECRET)
    doc["files"][bad] = {"size": len(SECRET), "checksum": hasher.hexdigest()}
    remote.fs.pipe_file(key, json.dumps(doc).encode())
    remote.fs.pipe_file(f"{remote.path}/step-00000001/{bad.lstrip('/')}", SECRET)
    return remote, url, tmp_path / "escape.json"


@pytest.mark.parametrize(
    "bad",
    [
        "../../../escape.json",
        "train_state/../../../../escape.json",
        "train_state\\..\\..\\..\\..\\escape.json",
        "ABSOLUTE",
    ],
    ids=["dotdot", "nested-dotdot", "backslashes", "absolute"],
)
def test_object_store_rank_download_stays_inside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: str
) -> None:
    """`rank_copy` (each torchrun rank's download) and the one-process download refuse a manifest that
    names a file outside the checkpoint, before any object is written to disk."""
    from savepoint.storage.remote_restore import rank_copy

    cache = tmp_path / "cache"
    monkeypatch.setenv("SAVEPOINT_CACHE", str(cache))
    escape = tmp_path / "escape.json"
    if bad == "ABSOLUTE":
        bad = str(escape)
    remote, url, _ = _remote_with_listed(tmp_path, bad)
    state = train_state(1, fresh=True)
    step_url = remote.step_url("step-00000001")
    with (
        pytest.raises(UnsafeCheckpointError, match=r"climbs out|absolute"),
        rank_copy(remote, step_url, rank=0, model=state.model, optimizer=None),
    ):
        pass
    with pytest.raises(SavepointError):
        savepoint.CheckpointManager(url).restore(model=state.model, step=1)
    assert not escape.exists(), "a download was written outside its directory"
    assert not [p for p in cache.rglob("*") if p.is_file()], "a refused download left files behind"
    remote.fs.rm(remote.path, recursive=True)


# ---------------------------------------------------------------- DeepSpeed: `latest` and the tag directory


def _bare_deepspeed(tmp_path: Path) -> tuple[Path, Path]:
    """(a bare DeepSpeed directory, a directory outside it holding what looks like a DeepSpeed tag)."""
    source, outside = tmp_path / "ds", tmp_path / "outside"
    for tag_dir in (source / "global_step1", outside / "global_step9"):
        tag_dir.mkdir(parents=True)
        (tag_dir / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(SECRET)
    (outside / "latest").write_bytes(SECRET)
    return source, outside


@pytest.mark.parametrize("plant", ["latest-symlinked-out", "tag-symlinked-out", "tag-dotdot"])
def test_deepspeed_latest_never_leads_outside(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, plant: str
) -> None:
    """`consolidate` of a bare DeepSpeed directory follows `latest` only to a real subdirectory of it."""
    from savepoint.integrations.deepspeed import find_checkpoint

    source, outside = _bare_deepspeed(tmp_path)
    if plant == "latest-symlinked-out":
        os.symlink(outside / "latest", source / "latest")
    elif plant == "tag-symlinked-out":
        shutil.rmtree(source / "global_step1")
        os.symlink(outside / "global_step9", source / "global_step1")
        (source / "latest").write_text("global_step1")
    else:
        (source / "latest").write_text("..")
        shutil.copytree(outside / "global_step9", tmp_path / "global_step9")
        (tmp_path / "latest").write_text("global_step9")
    try:
        found = find_checkpoint(str(source))
    except UnsafeCheckpointError as exc:
        assert "symbolic link" in str(exc)
        found = None
    assert found is None or os.path.realpath(found).startswith(str(source.resolve()) + os.sep), found
    out = tmp_path / "out"
    code, text = cli_ok(capsys, monkeypatch, "consolidate", source, out)
    assert code != 0 and not out.exists()
    assert "outside" not in text.replace(str(tmp_path), "") and "global_step9" not in text, text


# ---------------------------------------------------------------- the writer process of async_save="process"


def _process_saves(root: str, between) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """Two saves of the same model through the writer process; (parent inode, child inode) of the weights."""
    state = train_state(1)
    mgr = savepoint.CheckpointManager(root, async_save="process", keep_last=2)
    try:
        mgr.save(1, model=state.model)
        mgr.wait()
        between(os.path.join(step_path(root, 1), "model.safetensors"))
        mgr.save(2, model=state.model)
        mgr.wait()
    finally:
        mgr.close()
    parent = os.lstat(os.path.join(step_path(root, 1), "model.safetensors")).st_ino
    return parent, os.stat(os.path.join(step_path(root, 2), "model.safetensors")).st_ino


@pytest.mark.parametrize(
    "hazard",
    ["none", "world-writable", "symlinked-out", "hostile-manifest-beside"] if FULL else ["symlinked-out"],
)
def test_writer_process_trusts_nothing_on_disk(tmp_path: Path, hazard: str) -> None:
    """The writer process dedupes and applies retention as a synchronous save does: it links only to
    a file of its own that no one else can write, follows no planted symlink, and a hostile manifest
    beside it in the root damages that one checkpoint, never the save."""
    root = str(tmp_path / "run")
    outside = tmp_path / "outside.safetensors"

    def plant(path: str) -> None:
        if hazard == "world-writable":
            os.chmod(path, 0o646)
        elif hazard == "symlinked-out":
            shutil.move(path, outside)
            os.symlink(outside, path)
        elif hazard == "hostile-manifest-beside":
            shutil.copytree(step_path(root, 1), step_path(root, 7))  # a later step, made hostile
            manifest = Path(step_path(root, 7), "savepoint.json")
            doc = json.loads(manifest.read_bytes())
            doc["world_size"] = 10**9
            manifest.write_text(json.dumps(doc))

    before = outside.read_bytes() if outside.exists() else None
    parent, child = _process_saves(root, plant)
    if hazard == "none":
        assert parent == child, "the writer process did not link an unchanged file of its own"
    elif hazard == "hostile-manifest-beside":
        assert savepoint.verify(step_path(root, 2)) and os.path.isdir(step_path(root, 7))
    else:
        assert parent != child, f"the writer process linked to a {hazard} file"
        assert child != os.stat(outside).st_ino if outside.exists() else True
    assert savepoint.verify(step_path(root, 2))
    if before is not None:
        assert outside.read_bytes() == before


def test_object_store_manifest_swapped_after_its_size_was_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manifest object replaced by a huge one between the size check and the read (the store
    answers the size of the old object): the read stops one byte past the cap."""
    from savepoint.manifest import MAX_MANIFEST_BYTES
    from savepoint.storage.remote import RemoteRoot

    monkeypatch.setenv("SAVEPOINT_CACHE", str(tmp_path / "cache"))
    url = f"memory://hostile-{os.getpid()}-{time.monotonic_ns()}/run"
    save_steps(url, (1,))
    remote = RemoteRoot(url)
    key = f"{remote.path}/step-00000001/savepoint.json"
    listed = len(remote.fs.cat_file(key))
    remote.fs.pipe_file(key, remote.fs.cat_file(key) + b" " * MAX_MANIFEST_BYTES)  # still valid JSON
    monkeypatch.setattr(remote.fs, "size", lambda path, **kw: listed)
    with pytest.raises(CorruptCheckpointError, match=r"savepoint\.json: grew past"):
        remote.manifest_bytes("step-00000001")
    remote.fs.rm(remote.path, recursive=True)


# ---------------------------------------------------------------- the Accelerate helper's data-loader position


def _prepared(seed: int) -> tuple[Any, Any, Any]:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    torch.manual_seed(seed)
    config = DataLoaderConfiguration(use_stateful_dataloader=True, use_seedable_sampler=True)
    accelerator = Accelerator(cpu=True, dataloader_config=config)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    loader = torch.utils.data.DataLoader(torch.arange(24.0).reshape(12, 2), batch_size=2, shuffle=True)
    return accelerator.prepare(model, optimizer, loader)


LOADER_FORGERIES = {
    "epoch-string": lambda s: s.update(epoch="x"),
    "epoch-negative": lambda s: s.update(epoch=-5),
    "epoch-infinity": lambda s: s.update(epoch={"__float__": "inf"}),
    "position-missing": lambda s: s.pop("position"),
    "generator-state-short": lambda s: s["position"].update(generators={"g": [1, 2]}),
}


@pytest.mark.parametrize("forgery", sorted(LOADER_FORGERIES))
def test_accelerate_loader_position_forged(tmp_path: Path, forgery: str) -> None:
    """`AcceleratorCheckpointer.restore` with a forged data-loader position (manifest recomputed):
    refused by name before anything changes, never taken as the loader's epoch."""
    pytest.importorskip("accelerate")
    pytest.importorskip("torchdata")
    from savepoint.integrations.accelerate import AcceleratorCheckpointer

    model, optimizer, loader = _prepared(0)
    batches = iter(loader)
    next(batches)
    root = str(tmp_path / "run")
    AcceleratorCheckpointer(root).save(1, model=model, optimizer=optimizer, dataloader=loader)
    doc_path = Path(ckpt_of(root), "train_state/stateful/dataloader.json")
    doc = json.loads(doc_path.read_bytes())
    LOADER_FORGERIES[forgery](doc["state"])
    doc_path.write_text(json.dumps(doc))
    relist(ckpt_of(root))
    fresh, fresh_opt, fresh_loader = _prepared(1)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    epoch, position = fresh_loader.iteration, fresh_loader.state_dict()
    with pytest.raises(CorruptCheckpointError, match=r"dataloader"):
        AcceleratorCheckpointer(root).restore(
            model=fresh, optimizer=fresh_opt, dataloader=fresh_loader, step=1
        )
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    assert fresh_loader.iteration == epoch and fresh_loader.state_dict() == position
