"""Objects prepared by `Accelerator` save and restore through savepoint: a run SIGKILLed twice (once
mid-epoch, once right after the last batch of an epoch) and resumed each time matches one never
stopped, step for step (loss and global torch RNG), in one process and under `accelerate launch`
with 2 CPU processes. The loop is written as Accelerate's docs write it: an outer epoch loop, a plain
`DataLoader(shuffle=True)` without `generator=`, dropout on."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import savepoint

SCRIPT = Path(__file__).with_name("accelerate_script.py")
REPO = Path(__file__).resolve().parents[2]

# processes -> (epochs, kills): 12 rows of batch 2 are 6 steps per epoch alone, 3 per process with 2.
# Saves every 2 steps; each kill resumes from the step before it: mid-epoch first, then from the
# last batch of an epoch (where Accelerate has not yet counted the epoch as done).
PLANS = {1: (3, [5, 13]), 2: (4, [5, 7])}


def launch(processes: int, root: Path, log: Path, *extra: str) -> subprocess.CompletedProcess[bytes]:
    env = dict(
        os.environ,
        PYTHONPATH=f"{REPO / 'src'}{os.pathsep}{REPO}",
        PYTHONWARNINGS="ignore",
        OMP_NUM_THREADS="1",
    )
    epochs, _ = PLANS[processes]
    args = [str(SCRIPT), str(root), str(log), "--epochs", str(epochs), *extra]
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
    return subprocess.run(cmd, env=env, capture_output=True, timeout=600)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(log: Path, processes: int) -> dict[tuple[int, int], dict[str, object]]:
    out = {}
    for p in range(processes):
        for line in Path(f"{log}.process-{p}").read_text().splitlines():
            r = json.loads(line)
            out[(r["process"], r["step"])] = {k: r[k] for k in ("epoch", "loss", "rng")}
    return out


@pytest.mark.parametrize("processes", [1, 2])
def test_killed_and_resumed_accelerate_run_matches(tmp_path: Path, processes: int) -> None:
    epochs, kills = PLANS[processes]
    done = launch(processes, tmp_path / "ref", tmp_path / "ref.jsonl")
    assert done.returncode == 0, (done.stdout + done.stderr).decode()[-4000:]
    expected = records(tmp_path / "ref.jsonl", processes)

    run = tmp_path / "run"
    for i, die_at in enumerate(kills):
        killed = launch(processes, run, tmp_path / f"{i}.jsonl", "--die-at", str(die_at))
        if processes == 1:
            assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-4000:]
        else:
            assert killed.returncode != 0, "the launcher did not report its processes' deaths"
        assert savepoint.CheckpointManager(run).latest_step == die_at - 1
    done = launch(processes, run, tmp_path / "last.jsonl")
    assert done.returncode == 0, (done.stdout + done.stderr).decode()[-4000:]

    # Every run after a kill starts at the step after the checkpoint and matches the reference.
    starts = [1, *kills]
    for i, log in enumerate([*(f"{i}.jsonl" for i in range(len(kills))), "last.jsonl"]):
        ours = records(tmp_path / log, processes)
        last = kills[i] if i < len(kills) else max(s for _, s in expected)
        assert sorted({s for _, s in ours}) == list(range(starts[i], last + 1)), log
        assert len({p for p, _ in ours}) == processes
        for key, record in ours.items():
            assert record == expected[key], (
                f"{log}: process {key[0]}, step {key[1]} diverged from the reference"
            )
    assert max(r["epoch"] for r in expected.values()) == epochs - 1

    final = savepoint.CheckpointManager(run).latest_step
    ours_model = load_file(run / f"step-{final:08d}" / "model.safetensors")
    theirs = load_file(tmp_path / "ref" / f"step-{final:08d}" / "model.safetensors")
    assert all(torch.equal(ours_model[k], theirs[k]) for k in theirs)
    savepoint.verify(run)


def prepared_loader(rows: int) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    accelerator = Accelerator(
        cpu=True,
        dataloader_config=DataLoaderConfiguration(use_stateful_dataloader=True, use_seedable_sampler=True),
    )
    return accelerator.prepare(torch.utils.data.DataLoader(torch.arange(rows), batch_size=2, shuffle=True))


def test_a_position_at_the_last_batch_resumes_with_the_next_epoch() -> None:
    """Accelerate counts the epoch only once its iterator is exhausted, after the loop body of the
    last batch: a checkpoint taken in that body must still record the next epoch."""
    from savepoint.integrations.accelerate import epoch_to_resume

    loader = prepared_loader(6)
    for epoch in range(2):
        during = []
        for _ in loader:
            during.append((loader.iteration, epoch_to_resume(loader)))
        assert during == [(epoch, epoch), (epoch, epoch), (epoch, epoch + 1)]
        assert (loader.iteration, epoch_to_resume(loader)) == (epoch + 1, epoch + 1)  # after the loop


def test_a_restored_loader_reports_its_position_before_it_iterates_and_goes_on_from_it() -> None:
    from savepoint.integrations.accelerate import LoaderPosition

    torch.manual_seed(0)
    loader = prepared_loader(10)
    batches = iter(loader)
    next(batches), next(batches)
    saved = LoaderPosition(loader).state_dict()

    other = prepared_loader(10)
    LoaderPosition(other).load_state_dict(saved)
    assert LoaderPosition(other).state_dict() == saved  # a save right after a restore
    rest = [b.tolist() for b in other]
    assert rest == [b.tolist() for b in batches] and len(rest) == 3


def test_a_prepared_loader_given_straight_to_the_manager_resumes_with_the_global_rng_exact(
    tmp_path: Path,
) -> None:
    """Without AcceleratorCheckpointer: `stateful={"data": loader}` on a prepared plain shuffled loader.

    The resumed iterator must be built during restore, before the RNG states go back; built at the
    user's next iter(), it would draw a seed from the global RNG and shift dropout from then on."""
    import savepoint

    torch.manual_seed(0)
    loader = prepared_loader(10)
    batches = iter(loader)
    next(batches), next(batches)
    with savepoint.CheckpointManager(str(tmp_path / "run")) as mgr:
        mgr.save(2, model=torch.nn.Linear(2, 2), stateful={"data": loader})
    expected_rest = [b.tolist() for b in batches]
    expected_draw = torch.rand(4)

    torch.manual_seed(0)  # a fresh process: the script seeds, prepares, then restores
    other = prepared_loader(10)
    torch.rand(7)  # model init and whatever else the script draws before restore
    with savepoint.CheckpointManager(str(tmp_path / "run")) as mgr:
        assert mgr.restore(model=torch.nn.Linear(2, 2), stateful={"data": other}).step == 2
    assert [b.tolist() for b in other] == expected_rest
    assert torch.equal(torch.rand(4), expected_draw)
