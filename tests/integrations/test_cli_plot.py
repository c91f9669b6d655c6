"""`savepoint plot`: a metric across checkpoints, drawn to a PNG with best and latest marked."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import savepoint
from savepoint.cli import _register_commands
from savepoint.cli.app import app
from savepoint.cli.plot import plot_metric


def make_run(root: str, losses: dict[int, float]) -> None:
    model = torch.nn.Linear(2, 2)
    with savepoint.CheckpointManager(root) as mgr:
        for step, loss in losses.items():
            mgr.save(step, model=model, metrics={"eval_loss": loss, "reward": -loss})


def test_plot_command_writes_png_marking_best_and_latest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_run(str(tmp_path / "run"), {10: 2.0, 20: 1.2, 30: 1.5})
    drawn: dict[str, object] = {}
    import matplotlib.axes

    scatter = matplotlib.axes.Axes.scatter

    def spy(self, x, y, *args, **kwargs):  # type: ignore[no-untyped-def]
        drawn[kwargs["label"].split()[0]] = (list(x), list(y))
        return scatter(self, x, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "scatter", spy)
    _register_commands()
    out = tmp_path / "loss.png"
    result = CliRunner().invoke(
        app, ["plot", str(tmp_path / "run"), "--metric", "eval_loss", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    assert drawn == {"best": ([20], [1.2]), "latest": ([30], [1.5])}

    plot_metric(str(tmp_path / "run"), "reward", str(tmp_path / "r.png"), best_mode="max")
    assert drawn["best"] == ([20], [-1.2])


def test_plot_remote_root_and_unknown_metric(tmp_path: Path, memory_root: str) -> None:
    make_run(memory_root, {1: 0.5, 2: 0.4})
    assert Path(plot_metric(memory_root, "eval_loss", str(tmp_path / "m.png"))).is_file()
    with pytest.raises(savepoint.SavepointError, match="metrics found: eval_loss, reward"):
        plot_metric(memory_root, "accuracy", str(tmp_path / "x.png"))
