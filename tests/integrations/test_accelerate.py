"""Objects prepared by `Accelerator` save and restore through savepoint: a run stopped abruptly and
resumed matches one never stopped, step for step, in one process and under `accelerate launch`
with 2 CPU processes (each process's data position and RNG come back to it)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import savepoint

SCRIPT = Path(__file__).with_name("accelerate_script.py")
REPO = Path(__file__).resolve().parents[2]
STEPS = 12  # 20 rows, batch 2: 10 batches per process per epoch alone, 5 each with 2 processes


def launch(processes: int, root: Path, log: Path, *extra: str) -> None:
    env = dict(
        os.environ,
        PYTHONPATH=f"{REPO / 'src'}{os.pathsep}{REPO}",
        PYTHONWARNINGS="ignore",
        OMP_NUM_THREADS="1",
    )
    args = [str(SCRIPT), str(root), str(log), "--steps", str(STEPS), *extra]
    if processes == 1:
        cmd = [sys.executable, *args]
    else:
        accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
        assert accelerate, "the accelerate launcher is not installed next to this python"
        # --multi_gpu picks the torchrun launcher; the script's Accelerator(cpu=True) makes it gloo on CPUs
        cmd = [
            accelerate,
            "launch",
            "--multi_gpu",
            "--num_processes",
            str(processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(free_port()),
            *args,
        ]
    done = subprocess.run(cmd, env=env, capture_output=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr).decode()[-4000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(log: Path, processes: int) -> dict[tuple[int, int], float]:
    out = {}
    for p in range(processes):
        for line in Path(f"{log}.process-{p}").read_text().splitlines():
            r = json.loads(line)
            out[(r["process"], r["step"])] = r["loss"]
    return out


@pytest.mark.parametrize("processes", [1, 2])
def test_stopped_and_resumed_accelerate_run_matches(tmp_path: Path, processes: int) -> None:
    launch(processes, tmp_path / "ref", tmp_path / "ref.jsonl")
    launch(processes, tmp_path / "run", tmp_path / "a.jsonl", "--stop-at", "8")  # last save: step 6
    assert savepoint.CheckpointManager(tmp_path / "run").latest_step == 6
    launch(processes, tmp_path / "run", tmp_path / "b.jsonl")

    expected = losses(tmp_path / "ref.jsonl", processes)
    resumed = losses(tmp_path / "b.jsonl", processes)
    assert sorted({s for _, s in resumed}) == list(range(7, STEPS + 1))
    assert resumed == {k: expected[k] for k in resumed}, "the resumed run diverged"
    assert len({p for p, _ in resumed}) == processes

    ours = load_file(tmp_path / "run" / f"step-{STEPS:08d}" / "model.safetensors")
    theirs = load_file(tmp_path / "ref" / f"step-{STEPS:08d}" / "model.safetensors")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    savepoint.verify(tmp_path / "run")
