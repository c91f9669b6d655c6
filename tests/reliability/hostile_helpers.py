"""Shared by the hostile-input classes: building attacks on real saves, running the real CLI."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from tests.reliability.scenarios import train_state

import savepoint

SECRET = b"secret bytes that live outside the checkpoint\n"


def plant_secret(tmp_path: Path) -> Path:
    """A file outside every checkpoint: it must keep its bytes, and never show up in an output."""
    path = tmp_path / "outside" / "secret.json"
    path.parent.mkdir()
    path.write_bytes(SECRET)
    return path


def save_steps(root: str, steps: tuple[int, ...], **manager: object) -> None:
    with savepoint.CheckpointManager(root, **manager) as mgr:  # type: ignore[arg-type]
        for step in steps:
            state = train_state(step)
            mgr.save(step, model=state.model, **state.kwargs)


def step_path(root: str, step: int) -> str:
    return os.path.join(root, f"step-{step:08d}")


def outputs_hold(out: Path, data: bytes) -> bool:
    return out.exists() and any(p.is_file() and data in p.read_bytes() for p in out.rglob("*"))


def cli(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: object
) -> tuple[int, str]:
    """`savepoint ARGS...` in-process through the real main(); (exit code, stdout + stderr)."""
    return cli_ok(capsys, monkeypatch, *args)


def cli_ok(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: object
) -> tuple[int, str]:
    """As `cli`, for commands that may also return normally (exit 0 without SystemExit)."""
    from savepoint.cli import _register_commands, main

    _register_commands()
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.setattr(sys, "argv", ["savepoint", *map(str, args)])
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out + out.err


def lora_ckpt(tmp_path: Path) -> tuple[str, str]:
    """(LoRA checkpoint, its base model directory), saved for real."""
    from tests.reliability.test_hostile_inputs import _lora_checkpoint

    return _lora_checkpoint(tmp_path)
