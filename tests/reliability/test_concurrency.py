"""Concurrency: one writer per root (a clear refusal naming the holder, no stale lock after a crash),
and readers (`ls`, `verify`, `restore`) that never block on a writer and never see a partial save.

Writers run in real subprocesses (`child.py once`), readers in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings

import pytest
from tests.reliability.harness import CHILD, FULL
from tests.reliability.scenarios import SCENARIOS, compare, train_state

import savepoint
from savepoint.discovery import list_checkpoints
from savepoint.errors import LockedRootError, SavepointError

READ_SECONDS = 40 if FULL else 8


def start(request: dict, tmp: str) -> tuple[subprocess.Popen, str]:
    """Start a child (`hold` or `writer`) and wait until it says it is ready."""
    ready = os.path.join(tmp, f"ready-{request['cmd']}")
    req = {**request, "ready": ready, "result": ready + ".json", "log": ready + ".log"}
    proc = subprocess.Popen([sys.executable, CHILD, "once", json.dumps(req)])
    deadline = time.monotonic() + 120
    while not os.path.exists(ready):
        assert proc.poll() is None, f"the child exited early; see {req['log']}"
        assert time.monotonic() < deadline, "the child never got ready"
        time.sleep(0.05)
    with open(ready) as f:
        return proc, f.read()


def save_once(root: str, step: int) -> None:
    state = train_state(step)
    with savepoint.CheckpointManager(root) as mgr:
        mgr.save(step, model=state.model, **state.kwargs)


def test_second_writer_is_refused_naming_the_holder(tmp_path, tally) -> None:
    root = str(tmp_path / "run")
    proc, pid = start({"cmd": "hold", "root": root, "seconds": 30}, str(tmp_path))
    t = tally("concurrency: second writer")
    try:
        start_time = time.monotonic()
        with pytest.raises(LockedRootError, match=f"process {pid} on "):
            save_once(root, 1)
        t.case(
            "refused at once, naming the holder", [] if time.monotonic() - start_time < 5 else ["it waited"]
        )
        # Readers do not take the lock: they work while a writer holds it.
        assert list_checkpoints(root) == []
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("garbage", [None, b"{not json", b""])
def test_a_crashed_holder_never_blocks_the_root(tmp_path, tally, garbage: bytes | None) -> None:
    root = str(tmp_path / "run")
    proc, _ = start({"cmd": "hold", "root": root, "seconds": 0, "crash": True}, str(tmp_path))
    proc.wait()
    assert proc.returncode == 137
    if garbage is not None:  # a holder killed while writing its name leaves a torn lock file
        with open(os.path.join(root, ".savepoint.lock"), "wb") as f:
            f.write(garbage)
    t = tally("concurrency: stale lock after a crash")
    try:
        save_once(root, 1)
        t.case(f"lock file {garbage!r}", [])
    except SavepointError as exc:
        t.case(f"lock file {garbage!r}", [str(exc)])
    assert not t.failures, t.report()


def test_readers_never_block_nor_see_a_partial_checkpoint(tmp_path, tally) -> None:
    """A writer saves and prunes (keep_last=2) in a loop; readers list, verify and restore meanwhile."""
    root = str(tmp_path / "run")
    save_once(root, 1)
    proc, _ = start(
        {"cmd": "writer", "scenario": "train-state", "root": root, "seconds": READ_SECONDS, "first_step": 2},
        str(tmp_path),
    )
    t = tally("concurrency: readers during saves and retention")
    scenario = SCENARIOS["train-state"]
    try:
        while proc.poll() is None:
            read_round(root, scenario, t)
    finally:
        proc.kill()
        proc.wait()
    assert t.tried > 10, "too few reads overlapped the writer to say anything"
    assert not t.failures, t.report()


def read_round(root: str, scenario, t) -> None:  # type: ignore[no-untyped-def]
    """One `ls`, a `verify` of each listed checkpoint, and a `restore('latest')`."""
    start_time = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        infos = list_checkpoints(root, warn=False)
    problems = []
    for info in infos:
        try:
            savepoint.verify(info.path)
        except SavepointError as exc:
            # Retention may delete a listed checkpoint before we get to it: that is not damage.
            if os.path.exists(info.path):
                problems.append(f"listed {info.path} does not verify: {exc}")
    fresh = train_state(1, fresh=True)
    kwargs = {k: fresh.kwargs[k] for k in ("optimizer", "scheduler", "stateful")}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = savepoint.CheckpointManager(root).restore(model=fresh.model, **kwargs)
        if result.step:
            problems += compare(fresh, train_state(result.step))
    except SavepointError as exc:
        if result_dir_exists(root, exc):
            problems.append(f"restore('latest') failed: {exc}")
    except Exception as exc:  # anything but a SavepointError is a bug, race or not
        problems.append(f"restore('latest') raised {type(exc).__name__}: {exc}")
    if time.monotonic() - start_time > 10:
        problems.append("a read round took over 10 s: blocked on the writer?")
    t.case(f"read round at {sorted(i.step for i in infos)}", problems)


def result_dir_exists(root: str, exc: SavepointError) -> bool:
    """Whether the checkpoint an error names is still there (if not, retention won a race)."""
    path = getattr(exc, "checkpoint", "")
    return bool(path) and os.path.exists(path)
