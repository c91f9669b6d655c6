"""`savepoint verify`: 0 when intact, 1 naming each damaged file, 2 when there is nothing to verify."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.cli.cli_helpers import flip_byte, step_dir, truncate


def test_intact_root(cli, llama_run: Path) -> None:
    result = cli("verify", llama_run)
    assert result.code == 0, result.out + result.err
    for step in (10, 20, 30):
        assert f"✓ step-{step:08d}: intact" in result.out


def test_intact_single_checkpoint(cli, module_run: Path) -> None:
    result = cli("verify", step_dir(module_run, 10))
    assert result.code == 0
    assert "step-00000010: intact" in result.out and "step-00000005" not in result.out


def _flip(ckpt: Path) -> str:
    flip_byte(ckpt / "model.safetensors")
    return "model.safetensors: checksum mismatch"


def _truncate(ckpt: Path) -> str:
    truncate(ckpt / "model.safetensors")
    return "model.safetensors: size"


def _missing(ckpt: Path) -> str:
    (ckpt / "train_state" / "optimizer.safetensors").unlink()
    return "train_state/optimizer.safetensors: missing"


def _extra(ckpt: Path) -> str:
    (ckpt / "planted.bin").write_bytes(b"\x80\x04surprise")
    return "planted.bin: present but not listed"


def _manifest(ckpt: Path) -> str:
    (ckpt / "savepoint.json").write_text("[]")
    return "savepoint.json: not a savepoint manifest"


@pytest.mark.parametrize("damage", [_flip, _truncate, _missing, _extra, _manifest])
def test_damage_names_the_file_and_exits_1(
    cli, llama_run: Path, run_copy, damage: Callable[[Path], str]
) -> None:
    root = run_copy(llama_run)
    expected = damage(step_dir(root, 20))
    result = cli("verify", root)
    assert result.code == 1
    assert f"step-00000020/{expected}" in result.out
    # The other checkpoints are still vouched for, and the summary counts the damage.
    assert "✓ step-00000010: intact" in result.out and "✓ step-00000030: intact" in result.out
    assert "1 of 3 checkpoint(s) damaged" in result.out


def test_damage_in_a_single_checkpoint(cli, module_run: Path, run_copy) -> None:
    ckpt = step_dir(run_copy(module_run), 15)
    flip_byte(ckpt / "train_state" / "stateful" / "loader.json", offset=2)
    result = cli("verify", ckpt)
    assert result.code == 1
    assert "step-00000015/train_state/stateful/loader.json: checksum mismatch" in result.out


def test_step_dir_without_manifest_is_damage(cli, module_run: Path, run_copy) -> None:
    ckpt = step_dir(run_copy(module_run), 5)
    (ckpt / "savepoint.json").unlink()
    result = cli("verify", ckpt)
    assert result.code == 1
    assert "step-00000005/savepoint.json: missing" in result.out


def test_missing_path_exits_2(cli, tmp_path: Path) -> None:
    result = cli("verify", tmp_path / "nope")
    assert result.code == 2
    assert "does not exist" in result.err


def test_directory_without_checkpoints_exits_2(cli, tmp_path: Path) -> None:
    result = cli("verify", tmp_path)
    assert result.code == 2
    assert "nothing to verify" in result.err


def test_file_named_like_a_checkpoint_is_damage(cli, module_run: Path, run_copy) -> None:
    root = run_copy(module_run)
    (root / "step-00000020").write_bytes(b"not a directory")
    result = cli("verify", root)
    assert result.code == 1
    assert "step-00000020: is a file, not a checkpoint directory" in result.out
    assert "step-00000015: intact" in result.out


def test_progress_bar_on_a_terminal(module_run: Path, monkeypatch) -> None:
    from rich.console import Console

    from savepoint.cli import verify as verify_cli

    terminal = Console(file=io.StringIO(), force_terminal=True, width=120)
    monkeypatch.setattr(verify_cli, "console", terminal)
    verdicts = verify_cli._verify_all(verify_cli.checkpoints_to_verify(str(module_run)))
    assert [v.intact for v in verdicts] == [True, True, True]
    assert "verifying" in terminal.file.getvalue()
