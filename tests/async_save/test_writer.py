"""BackgroundWriter: one save in flight, errors never lost, pending saves finished at exit and on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from tests.async_save.helpers import WriterGate

import savepoint
from savepoint.errors import StorageError
from savepoint.snapshot import BackgroundWriter

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_background_error_is_raised_by_wait_once(tmp_path, monkeypatch):
    gate = WriterGate(monkeypatch, fail=StorageError("disk full (injected)"))
    mgr = savepoint.CheckpointManager(tmp_path / "run", async_save=True)
    mgr.save(1, model=torch.nn.Linear(2, 2))  # returns: the failure happens later
    gate.open()
    with pytest.raises(StorageError, match="injected"):
        mgr.wait()
    mgr.wait()  # reported once; the manager is usable again
    assert mgr.checkpoints == []


def test_background_error_is_raised_by_the_next_save(tmp_path, monkeypatch):
    gate = WriterGate(monkeypatch, fail=StorageError("disk full (injected)"))
    mgr = savepoint.CheckpointManager(tmp_path / "run", async_save=True)
    mgr.save(1, model=torch.nn.Linear(2, 2))
    gate.open()
    with pytest.raises(StorageError, match="injected"):
        mgr.save(2, model=torch.nn.Linear(2, 2))


def test_at_most_one_save_in_flight(tmp_path, monkeypatch):
    gate = WriterGate(monkeypatch)
    mgr = savepoint.CheckpointManager(tmp_path / "run", async_save=True)
    model = torch.nn.Linear(2, 2)
    mgr.save(1, model=model)
    gate.started.wait(timeout=30)
    second = threading.Thread(target=mgr.save, args=(2,), kwargs={"model": model})
    second.start()
    second.join(timeout=0.5)
    assert second.is_alive(), "save() must wait for the save in flight before starting another"
    gate.open()
    second.join(timeout=60)
    mgr.wait()
    assert gate.max_active == 1
    assert [i.step for i in mgr.checkpoints] == [1, 2]


def test_writer_runs_submissions_in_order_one_at_a_time():
    writer = BackgroundWriter()
    order: list[int] = []
    release = threading.Event()
    writer.submit(lambda: (release.wait(30), order.append(1)))
    assert writer.busy
    releaser = threading.Timer(0.2, release.set)
    releaser.start()
    writer.submit(lambda: order.append(2))  # blocks until the first is done
    assert order[0] == 1
    writer.wait()
    assert order == [1, 2] and not writer.busy


CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    import torch
    import savepoint

    mode, root = sys.argv[1], sys.argv[2]
    if mode == "chained":
        def mine(signum, frame):
            print("CHAINED", flush=True)
            sys.exit(3)
        signal.signal(signal.SIGTERM, mine)
    from savepoint import async_writer
    real = async_writer.write_plan
    def slow(*args):
        time.sleep(1.5)  # still writing when the process is told to stop
        return real(*args)
    async_writer.write_plan = slow
    mgr = savepoint.CheckpointManager(root, async_save=True)
    mgr.save(7, model=torch.nn.Linear(64, 64))
    print("SAVED", flush=True)
    if mode != "exit":
        time.sleep(60)  # a training loop, killed by SIGTERM
    """
)


def run_child(tmp_path, mode: str) -> tuple[subprocess.CompletedProcess[str], str]:
    root = str(tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(REPO, "src"), REPO])}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, mode, root],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "SAVED", proc.stderr.read() if proc.stderr else line
    if mode != "exit":
        proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, line + out, err), root


def assert_committed(root: str) -> None:
    path = os.path.join(root, "step-00000007")
    assert os.path.isfile(os.path.join(path, "savepoint.json")), os.listdir(root)
    assert savepoint.verify(path) == [path]


def test_pending_save_finishes_at_interpreter_exit(tmp_path):
    result, root = run_child(tmp_path, "exit")
    assert result.returncode == 0, result.stderr
    assert_committed(root)


def test_pending_save_finishes_on_sigterm_then_dies_by_sigterm(tmp_path):
    result, root = run_child(tmp_path, "default")
    assert result.returncode == -signal.SIGTERM, result.stderr
    assert "finishing the checkpoint" in result.stderr
    assert_committed(root)


def test_sigterm_handler_chains_to_the_one_installed_before(tmp_path):
    result, root = run_child(tmp_path, "chained")
    assert result.returncode == 3, result.stderr
    assert "CHAINED" in result.stdout
    assert_committed(root)
