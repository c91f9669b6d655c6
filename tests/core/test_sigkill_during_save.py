"""SIGKILL at arbitrary instants of a stream of saves never leaves a listed checkpoint that is broken."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

import savepoint
from savepoint.demo import tiny

SRC = str(Path(__file__).resolve().parents[2] / "src")
SAVER = textwrap.dedent(
    """
    import sys, torch, savepoint
    from savepoint.demo import tiny
    model = tiny.tiny_llama(seed=0, hidden_size=64, intermediate_size=128)
    opt = torch.optim.AdamW(model.parameters())
    mgr = savepoint.CheckpointManager(sys.argv[1], keep_last=3)
    start = mgr.restore(model=model, optimizer=opt).step
    print("ready", flush=True)
    for step in range(start + 1, 10_000):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(step)           # every tensor of checkpoint N holds the value N
        mgr.save(step, model=model, optimizer=opt)
    """
)


def test_sigkill_at_random_instants(tmp_path: Path) -> None:
    root = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=SRC, PYTHONWARNINGS="ignore")
    delays = [0.05, 0.3, 0.7, 0.2]
    for delay in delays:
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(root)], env=env, stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    infos = savepoint.CheckpointManager(root).checkpoints
    assert infos, "no save ever committed"
    savepoint.verify(root)  # every listed checkpoint is whole
    model = tiny.tiny_llama(seed=1, hidden_size=64, intermediate_size=128)
    for info in infos:
        result = savepoint.CheckpointManager(root).restore(model=model, step=info.step)
        assert all(torch.all(p == info.step) for p in model.parameters()), (
            f"step {info.step} holds other values"
        )
        assert result.step == info.step
    # a manager reopening the root sweeps what the killed saves left, and the next save works
    mgr = savepoint.CheckpointManager(root)
    mgr.save(infos[-1].step + 1, model=model)
    assert not [n for n in os.listdir(root) if n.startswith((".tmp-", ".del-", ".old-"))]
