"""Hostile roots and directories: nothing outside is read, written or deleted; no hang, no runaway.

The attacker made the checkpoint, the root around it, the base model or the adapter, controls every
byte (manifest included) and recomputes every checksum (`relist`). Each class builds one such attack
against real saves and asserts what a user must get: a `SavepointError` naming the file, nothing
outside touched (a sentinel file keeps its bytes, no file appears where the attacker pointed), and
for the whole root, one damaged checkpoint that never breaks listing, saving or retention.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import time
from pathlib import Path

import pytest
from tests.reliability.hostile_helpers import (
    SECRET,
    cli,
    cli_ok,
    save_steps,
    step_path,
)
from tests.reliability.scenarios import train_state
from tests.reliability.test_hostile_inputs import ckpt_of, relist, restore_into_fresh, run  # noqa: F401 (run: a fixture)

import savepoint
from savepoint.discovery import list_checkpoints
from savepoint.errors import (
    CorruptCheckpointError,
    SavepointError,
    UnsafeCheckpointError,
)
from savepoint.lora.export import export_checkpoint
from savepoint.storage.lock import LOCK_NAME

# ---------------------------------------------------------------- the root lock


@pytest.mark.parametrize("target", ["existing", "dangling"])
def test_lock_file_planted_as_a_symlink(tmp_path: Path, secret: Path, target: str) -> None:
    root = str(tmp_path / "run")
    save_steps(root, (1,))
    lock = os.path.join(root, LOCK_NAME)
    os.remove(lock)
    aim = secret if target == "existing" else tmp_path / "outside" / "created-by-savepoint"
    os.symlink(aim, lock)
    with pytest.raises(UnsafeCheckpointError, match=LOCK_NAME):
        save_steps(root, (2,))
    assert secret.read_bytes() == SECRET, "the lock was written through a symlink"
    assert not (tmp_path / "outside" / "created-by-savepoint").exists(), "the lock created a file outside"
    assert [i.step for i in list_checkpoints(root)] == [1]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["hardlink", "fifo", "oversized", "other-user"])
def test_lock_file_savepoint_did_not_create_is_never_truncated(
    tmp_path: Path, secret: Path, kind: str
) -> None:
    root = tmp_path / "run"
    root.mkdir()
    lock = root / LOCK_NAME
    if kind == "hardlink":
        os.link(secret, lock)  # the lock's name is also the name of a file elsewhere
    elif kind == "fifo":
        os.mkfifo(lock)
    elif kind == "oversized":
        lock.write_bytes(b"x" * 100_000)
    else:
        if os.geteuid() != 0:
            pytest.skip("needs root to give a file to another user")
        lock.write_bytes(b'{"pid": 1}')
        os.chown(lock, 65534, 65534)
    before = lock.read_bytes() if kind != "fifo" else b""
    with pytest.raises(UnsafeCheckpointError, match=LOCK_NAME):
        save_steps(str(root), (1,))
    if kind != "fifo":
        assert lock.read_bytes() == before, "a lock file savepoint did not create was rewritten"
    assert secret.read_bytes() == SECRET


# ---------------------------------------------------------------- hard-link dedupe


def _parent_model_file(root: str) -> str:
    return os.path.join(step_path(root, 1), "model.safetensors")


def _save_same_model_twice(root: str, between) -> tuple[os.stat_result, os.stat_result]:  # type: ignore[no-untyped-def]
    state = train_state(1)
    with savepoint.CheckpointManager(root) as mgr:
        mgr.save(1, model=state.model)
        between(_parent_model_file(root))
        mgr.save(2, model=state.model)
    return os.stat(_parent_model_file(root)), os.stat(os.path.join(step_path(root, 2), "model.safetensors"))


@pytest.mark.parametrize(
    "hazard", ["none", "group-writable", "world-writable", "linked-from-outside", "other-user"]
)
def test_dedupe_never_links_to_a_file_others_could_change(tmp_path: Path, hazard: str) -> None:
    outside = tmp_path / "outside-link"

    def plant(path: str) -> None:
        if hazard == "none":
            return  # the control: an unchanged file of ours, which dedupe must link
        if hazard == "group-writable":
            os.chmod(path, 0o664)
        elif hazard == "world-writable":
            os.chmod(path, 0o646)
        elif hazard == "linked-from-outside":
            os.link(path, outside)  # whoever owns this name can rewrite what a link would share
        else:
            if os.geteuid() != 0:
                pytest.skip("needs root to give a file to another user")
            os.chown(path, 65534, 65534)

    root = str(tmp_path / "run")
    parent, child = _save_same_model_twice(root, plant)
    if hazard == "none":
        assert parent.st_ino == child.st_ino, "dedupe did not link an unchanged file of its own"
    else:
        assert parent.st_ino != child.st_ino, f"linked to a {hazard} file"
    assert savepoint.verify(step_path(root, 2))


# ---------------------------------------------------------------- one bad manifest, one damaged checkpoint


HOSTILE_FIELDS = {
    "created-400-digits": {"created": 10**400},
    "metric-nan": {"metrics": "NaN"},
    "metric-infinity": {"metrics": "-Infinity"},
    "metric-400-digits": {"metrics": 10**400},
    "step-10^30": {"step": 10**30},
    "world-size-10^9": {"world_size": 10**9},
    "size-2^70": {"size": 2**70},
    "created-year-30000": {"created": 9.5e11},
}


def _write_hostile(ckpt: str, change: dict) -> None:
    doc = json.loads(Path(ckpt, "savepoint.json").read_bytes())
    ((key, value),) = change.items()
    if key == "metrics":
        raw = json.dumps(doc).replace('"metrics": {', f'"metrics": {{"evil": {value}, ', 1)
    elif key == "size":
        first = next(iter(doc["files"]))
        doc["files"][first]["size"] = value
        raw = json.dumps(doc)
    else:
        doc[key] = value
        raw = json.dumps(doc)
    Path(ckpt, "savepoint.json").write_text(raw)


@pytest.mark.parametrize("hostile", list(HOSTILE_FIELDS))
def test_one_hostile_manifest_damages_one_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, hostile: str
) -> None:
    root = str(tmp_path / "run")
    save_steps(root, (1, 2, 3))
    _write_hostile(step_path(root, 3), HOSTILE_FIELDS[hostile])
    listed = [i.step for i in list_checkpoints(root, warn=False)]
    if hostile == "created-year-30000":  # a plausible-looking number: listed, and `ls` must still print it
        assert listed == [1, 2, 3]
    else:
        assert listed == [1, 2], f"a manifest with {hostile} was listed"
        assert restore_into_fresh(root) is not None  # "latest" falls back to step 2
    code, out = cli_ok(capsys, monkeypatch, "ls", root)
    assert code == 0 and "step" in out
    code, out = cli_ok(capsys, monkeypatch, "ls", root, "--json")
    assert code == 0
    # Saving and retention go on for the whole root; the damaged checkpoint is left for a human.
    save_steps(root, (4,), keep_last=1)
    survivors = sorted(n for n in os.listdir(root) if n.startswith("step-"))
    assert "step-00000004" in survivors and "step-00000001" not in survivors
    assert savepoint.verify(step_path(root, 4))


def test_step_directory_named_with_non_ascii_digits(tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    save_steps(root, (1, 3))
    fake = os.path.join(root, "step-" + "\u0660" * 7 + "\u0669")  # Arabic-Indic digits: int() reads 9
    shutil.copytree(step_path(root, 3), fake)
    relist(fake, step=9)
    assert [i.step for i in list_checkpoints(root)] == [1, 3]
    assert savepoint.CheckpointManager(root).restore(model=train_state(1, fresh=True).model).step == 3
    save_steps(root, (4,), keep_last=1)
    assert os.path.isdir(fake), "retention deleted a directory that is not one of its checkpoints"


def test_step_directory_symlinked_out_of_the_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = str(tmp_path / "elsewhere")
    save_steps(elsewhere, (7,))
    outside = step_path(elsewhere, 7)
    before = sorted(os.listdir(outside))
    root = str(tmp_path / "run")
    save_steps(root, (1,))
    os.symlink(outside, step_path(root, 7))
    assert [i.step for i in list_checkpoints(root)] == [1]
    with pytest.raises(CorruptCheckpointError, match="symbolic link"):
        savepoint.verify(root)
    code, out = cli_ok(capsys, monkeypatch, "verify", root)
    assert code == 1 and "symbolic link" in out and "intact (" not in out.split("step-00000007")[1]
    code, out = cli_ok(capsys, monkeypatch, "ls", root)
    assert code == 0 and "symbolic link" in out
    with pytest.raises(UnsafeCheckpointError, match="symbolic link"):
        savepoint.CheckpointManager(root).restore(model=train_state(1, fresh=True).model, step=7)
    save_steps(root, (8, 9), keep_last=1)
    assert sorted(os.listdir(outside)) == before, "retention reached through a symlink"
    assert savepoint.verify(outside)


@pytest.mark.parametrize(
    "leftover", [".tmp-step-00000005-abcd", ".del-step-00000001-abcd", ".old-step-00000009-abcd"]
)
def test_sweep_never_deletes_through_a_symlink(tmp_path: Path, secret: Path, leftover: str) -> None:
    root = str(tmp_path / "run")
    save_steps(root, (1,))
    victim = secret.parent
    os.symlink(victim, os.path.join(root, leftover))  # looks like debris of an interrupted save
    save_steps(root, (2,), keep_last=1)  # opening the root sweeps; retention deletes step 1
    assert secret.read_bytes() == SECRET and sorted(os.listdir(victim)) == ["secret.json"]
    assert [i.step for i in list_checkpoints(root)] == [2]


# ---------------------------------------------------------------- symlinks and special files


def test_symlinks_inside_the_checkpoint_are_not_followed_either(run: str) -> None:  # noqa: F811
    ckpt = ckpt_of(run)
    os.rename(os.path.join(ckpt, "train_state"), os.path.join(ckpt, "state-copy"))
    os.symlink("state-copy", os.path.join(ckpt, "train_state"))  # points inside: still not followed
    relist(ckpt)
    doc = json.loads(Path(ckpt, "savepoint.json").read_bytes())  # list the files under the link's name
    doc["files"] = {rel.replace("state-copy/", "train_state/", 1): e for rel, e in doc["files"].items()}
    Path(ckpt, "savepoint.json").write_text(json.dumps(doc))
    with pytest.raises(CorruptCheckpointError, match="train_state"):
        savepoint.verify(ckpt)
    with pytest.raises(SavepointError):
        restore_into_fresh(run)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("special", ["socket", "device"])
def test_socket_or_device_in_place_of_a_file(
    run: str,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    special: str,
) -> None:
    ckpt = ckpt_of(run)
    path = os.path.join(ckpt, "train_state", "scheduler.json")
    os.remove(path)
    if special == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(path)
    else:
        if os.geteuid() != 0:
            pytest.skip("needs root to make a device node")
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero: endless bytes
    with pytest.raises(CorruptCheckpointError, match=r"scheduler\.json"):
        savepoint.verify(ckpt)
    with pytest.raises(CorruptCheckpointError):
        restore_into_fresh(run, 1)
    code, out = cli(capsys, monkeypatch, "inspect", ckpt)
    assert code == 1 and "scheduler.json" in out


@pytest.mark.timeout(60)
def test_directories_nested_deeper_than_any_save(
    run: str,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ckpt = ckpt_of(run)
    deep = Path(ckpt, *(["d"] * 400))  # deeper than the walk allows, and than Python's recursion limit
    deep.mkdir(parents=True)
    (deep / "x.txt").write_text("planted")
    with pytest.raises(CorruptCheckpointError, match="deeper"):
        savepoint.verify(ckpt)
    code, out = cli(capsys, monkeypatch, "verify", ckpt)
    assert code == 1 and "deeper" in out
    with pytest.raises(SavepointError):
        export_checkpoint(ckpt, str(Path(run).parent / "out"))


# ---------------------------------------------------------------- object stores


def test_remote_object_larger_than_its_listed_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAVEPOINT_CACHE", str(tmp_path / "cache"))
    from savepoint.storage.remote import RemoteRoot

    url = f"memory://hostile-{os.getpid()}-{time.monotonic_ns()}/run"
    save_steps(url, (1,))
    remote = RemoteRoot(url)
    fs = remote.fs
    key = remote.path + "/step-00000001/train_state/scheduler.json"
    listed = len(fs.cat_file(key))
    fs.pipe_file(key, b" " * (8 * 2**20))  # 8 MiB where the manifest lists a few hundred bytes
    with pytest.raises(CorruptCheckpointError, match=rf"scheduler.json: size {listed + 1} bytes"):
        savepoint.verify(url)
    fs.rm(remote.path, recursive=True)
