"""Training subprocesses for the demo: start them, follow their JSON-lines logs, SIGKILL on cue."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.progress import Progress, TaskID

import savepoint
from savepoint.demo.train import TrainConfig
from savepoint.discovery import step_dir_name
from savepoint.errors import SavepointError


class DemoError(SavepointError):
    """The demo could not run (a training process failed, or OUT is not the demo's to overwrite)."""


@dataclass
class Child:
    """One training process's name, checkpoint root and files, and the records read from its log."""

    name: str
    root: Path
    log: Path
    output: Path
    records: list[dict] = field(default_factory=list)


def _child_env() -> dict[str, str]:
    # The child imports the very savepoint this process runs, installed or not (a source checkout).
    package_parent = str(Path(next(iter(savepoint.__path__))).resolve().parent)
    paths = [package_parent, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "TOKENIZERS_PARALLELISM": "false"}


def start(child: Child, cfg: TrainConfig) -> subprocess.Popen[bytes]:
    """Start `python -m savepoint.demo.train` for `child`; its stdout and stderr go to `child.output`."""
    child.log.touch()
    argv = [sys.executable, "-m", "savepoint.demo.train", "--root", str(child.root), "--log", str(child.log)]
    argv += ["--config", json.dumps(asdict(cfg))]
    with open(child.output, "ab") as output:
        return subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT, env=_child_env())


class Watch:
    """Follows one running child: reads its log as it grows and advances its progress bar.

    With `kill_at`: once the child announces it is saving that step, SIGKILL is sent as soon as the
    save's temporary directory shows up in the root (or the save commits first, or after
    `ARM_TIMEOUT` seconds), so the kill lands in the middle of writing: the worst moment.
    """

    ARM_TIMEOUT = 5.0

    def __init__(
        self, child: Child, cfg: TrainConfig, progress: Progress, task: TaskID, *, kill_at: int | None = None
    ) -> None:
        self.child, self.progress, self.task, self.kill_at = child, progress, task, kill_at
        self.proc = start(child, cfg)
        self.killed = False
        self._armed_at: float | None = None
        self._log = open(child.log, encoding="utf-8")  # noqa: SIM115  (closed in poll when the child ends)
        self._pending = ""

    def poll(self) -> bool:
        """Read what the child wrote since the last call; False once it has ended (or been killed)."""
        exited = self.proc.poll() is not None  # checked before reading, so nothing written is missed
        self._pending += self._log.read()
        *lines, self._pending = self._pending.split("\n")  # a half-written last line waits for more
        for line in lines:
            record = json.loads(line)
            self.child.records.append(record)
            self._advance(record)
            if (
                self.kill_at is not None
                and record.get("event") == "saving"
                and record["step"] == self.kill_at
            ):
                self._armed_at = time.monotonic()
        if self._armed_at is not None and not exited and self._save_under_way(self._armed_at):
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.killed = exited = True
        if exited:
            self._log.close()
            self._check()
        return not exited

    def _save_under_way(self, armed_at: float) -> bool:
        root = self.child.root
        started = any(root.glob(".tmp-*")) or (root / step_dir_name(self.kill_at or 0)).exists()
        return started or time.monotonic() - armed_at > self.ARM_TIMEOUT

    def _advance(self, record: dict) -> None:
        if "loss" in record:
            self.progress.update(self.task, completed=record["step"], loss=f"loss {record['loss']:.4f}")
        elif record.get("event") == "start":
            self.progress.update(self.task, completed=record["step"])

    def _check(self) -> None:
        if self.killed or self.proc.returncode == 0:
            return
        tail = self.child.output.read_text(errors="replace")[-3000:]
        raise DemoError(
            f"the {self.child.name} training process exited with status {self.proc.returncode}:\n{tail}"
        )
