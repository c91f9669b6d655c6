"""A run killed with SIGKILL and resumed in a fresh process is bit-identical to one never interrupted.

Covers dropout, a shuffled torchdata StatefulDataLoader (resumes mid-epoch and exactly at an epoch
end, then crosses further epoch boundaries), python and numpy randomness, AdamW and an LR schedule.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

SCRIPT = Path(__file__).with_name("resume_script.py")
SRC = str(Path(__file__).resolve().parents[2] / "src")


def run(root: Path, log: Path, *extra: str) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, PYTHONPATH=SRC, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(root), str(log), *extra], env=env, capture_output=True
    )


def losses(log: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, log.read_text().splitlines())}


def final_tensors(root: Path, total: int) -> dict[str, object]:
    ckpt = root / f"step-{total:08d}"
    return {
        **load_file(ckpt / "model.safetensors"),
        **{f"opt/{k}": v for k, v in load_file(ckpt / "train_state" / "optimizer.safetensors").items()},
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("reference")
    done = run(root / "ckpt", root / "log.jsonl", "--total", "20")
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    return root / "ckpt", root / "log.jsonl"


@pytest.mark.parametrize(
    ("save_every", "die_at"),
    [
        (4, 10),  # restore at step 8: mid-epoch (batch 2 of epoch 2), then two epoch boundaries
        (6, 9),  # restore at step 6: exactly at the end of epoch 1, the torchdata trouble spot
        (5, 13),  # restore at 10, re-run steps 11-13 that the killed run had already taken
    ],
)
def test_killed_and_resumed_run_is_bit_identical(
    tmp_path: Path, reference, save_every: int, die_at: int
) -> None:  # type: ignore[no-untyped-def]
    ref_root, ref_log = reference
    killed = run(
        tmp_path / "ckpt", tmp_path / "log1.jsonl", "--save-every", str(save_every), "--die-at", str(die_at)
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    resumed = run(tmp_path / "ckpt", tmp_path / "log2.jsonl", "--save-every", str(save_every))
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]

    expected = losses(ref_log)
    first = losses(tmp_path / "log1.jsonl")
    second = losses(tmp_path / "log2.jsonl")
    restored_at = (die_at // save_every) * save_every
    assert min(second) == restored_at + 1
    assert {s: first[s] for s in first} == {s: expected[s] for s in first}
    assert second == {s: expected[s] for s in second}, "loss curve diverged after resume"

    ours, theirs = final_tensors(tmp_path / "ckpt", 20), final_tensors(ref_root, 20)
    assert ours.keys() == theirs.keys() and any(k.startswith("opt/") for k in ours)
    for key in theirs:
        assert ours[key].equal(theirs[key]), f"{key} differs from the uninterrupted run"  # type: ignore[attr-defined]
