"""The benchmark harness at tiny size, so `make bench` cannot rot between full runs."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_quick_benchmark_writes_tables_and_a_plot(tmp_path):
    out, plot = tmp_path / "BENCH.md", tmp_path / "bench.png"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(REPO, "src"), REPO])}
    cmd = [sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out), "--plot", str(plot)]
    result = subprocess.run(
        [*cmd, "--workdir", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=500
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    for section in (
        "Targets",
        "Save a bf16 model",
        "Save model + AdamW state",
        "Async save",
        "Async saves end to end",
        "Async writers: CPU per save",
        "Restore",
        "Restart from memory",
        "Dedupe",
    ):
        assert section in text
    assert "savepoint CheckpointManager.save" in text and "DCP save" in text
    assert plot.stat().st_size > 1000
    assert [p for p in os.listdir(tmp_path) if p.startswith("savepoint-bench-")] == []
