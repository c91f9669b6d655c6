"""The real thing, in a child process: `python -m savepoint` and the `savepoint` script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tests.cli.cli_helpers import flip_byte, step_dir


def _run(*args: object, script: bool = False) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("savepoint", path=os.path.dirname(sys.executable)) if script else None
    if script and exe is None:
        pytest.skip("the savepoint entry point is not installed next to this interpreter")
    command = [exe] if exe else [sys.executable, "-m", "savepoint"]
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [*command, *map(str, args)], capture_output=True, text=True, env=env, timeout=120, check=False
    )


def test_python_dash_m_verify(module_run: Path, tmp_path: Path) -> None:
    ok = _run("verify", module_run)
    assert ok.returncode == 0, ok.stderr
    assert "step-00000015: intact" in ok.stdout
    root = tmp_path / "run"
    shutil.copytree(module_run, root)
    flip_byte(step_dir(root, 10) / "model.safetensors")
    bad = _run("verify", root)
    assert bad.returncode == 1
    assert "step-00000010/model.safetensors: checksum mismatch" in bad.stdout


def test_entry_point_errors_exit_2_without_traceback(tmp_path: Path) -> None:
    result = _run("ls", tmp_path / "missing", script=True)
    assert result.returncode == 2
    assert "error:" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
