"""A save handed to the writer process survives the trainer: real SIGKILLs at several points.

Once save() has returned, the checkpoint commits even if the trainer dies at once; a trainer killed
before save() returned leaves the previous checkpoint intact and nothing partial listed. The writer
then exits on its own (it notices the trainer is gone only once it is idle).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import safetensors.torch
import torch

import savepoint
from savepoint.manifest import find_problems

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "process_trainer.py")


class Trainer:
    def __init__(self, root: str, mode: str, pause_s: float, width: int = 64) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, SCRIPT, root, mode, str(pause_s), str(width)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.writer_pid = int(self.expect("writer").split()[1])

    def expect(self, word: str) -> str:
        assert self.proc.stdout is not None
        while line := self.proc.stdout.readline():
            if line.startswith(word):
                return line
        raise AssertionError(f"trainer ended before printing {word!r}: {self.proc.communicate()[1][-3000:]}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)  # not communicate(): the writer holds the pipes until it exits
        assert self.proc.returncode == -signal.SIGKILL


def _gone(pid: int, timeout: float = 60) -> bool:
    """The writer exited (a zombie counts: nobody may be left to reap it in a container)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/status") as f:
                if any(line.startswith("State:") and "Z" in line for line in f):
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def _restored_weights(root: str, width: int = 64) -> dict[str, torch.Tensor]:
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Linear(width, width))
    with savepoint.CheckpointManager(root) as mgr:
        assert mgr.restore(model=model, optimizer=torch.optim.AdamW(model.parameters()), step=2).step == 2
    return model.state_dict()


def _assert_committed_as_expected(tmp_path: object, root: str) -> None:
    infos = savepoint.CheckpointManager(root).checkpoints
    assert [i.step for i in infos] == [1, 2]
    assert all(find_problems(i.path) == [] for i in infos)
    expected = safetensors.torch.load_file(os.path.join(os.path.dirname(root), "expected.safetensors"))
    got = _restored_weights(root)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in got)


def test_killed_right_after_save_returned_the_writer_still_commits(tmp_path):
    root = str(tmp_path / "run")
    trainer = Trainer(root, "returned", pause_s=0.3)  # the writer pauses after each file: mid-write
    trainer.expect("returned")
    trainer.kill()
    assert not _gone(trainer.writer_pid, timeout=0.2), "the writer died with its trainer"
    assert _gone(trainer.writer_pid), "the writer did not exit after committing"
    _assert_committed_as_expected(tmp_path, root)
    assert [n for n in os.listdir(root) if n.startswith(".tmp-")] == []


def test_killed_during_capture_leaves_the_previous_checkpoint_and_nothing_partial(tmp_path):
    root = str(tmp_path / "run")
    trainer = Trainer(root, "capture", pause_s=0.0)
    trainer.expect("capturing")
    trainer.kill()
    assert _gone(trainer.writer_pid), "an idle writer must exit when its trainer is gone"
    infos = savepoint.CheckpointManager(root).checkpoints
    assert [i.step for i in infos] == [1] and find_problems(infos[0].path) == []


def test_exit_without_wait_finishes_the_save_first(tmp_path):
    root = str(tmp_path / "run")
    trainer = Trainer(root, "exit", pause_s=0.1)
    _, err = trainer.proc.communicate(timeout=120)
    assert trainer.proc.returncode == 0, err[-3000:]
    assert "finishing the checkpoint being written before exit" in err
    assert _gone(trainer.writer_pid, timeout=5)
    _assert_committed_as_expected(tmp_path, root)


# One moment in `make test`; `make torture` (SAVEPOINT_TORTURE=full) tries eight.
@pytest.mark.parametrize("seed", range(8) if os.environ.get("SAVEPOINT_TORTURE") else [0])
def test_killed_at_a_random_moment_of_save_is_all_or_nothing(tmp_path, seed):
    """A bigger state (about 50 MB with AdamW) and a kill some milliseconds after save() was called:
    before the hand-off or after it, step 2 is either committed whole or not listed at all."""
    root = str(tmp_path / "run")
    trainer = Trainer(root, "returned", pause_s=0.0, width=1200)
    trainer.expect("saving")
    time.sleep(random.Random(seed).uniform(0.0, 0.15))
    trainer.kill()
    assert _gone(trainer.writer_pid)
    infos = savepoint.CheckpointManager(root).checkpoints
    assert [i.step for i in infos] in ([1], [1, 2])
    assert all(find_problems(i.path) == [] for i in infos)
