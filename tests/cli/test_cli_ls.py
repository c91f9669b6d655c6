"""`savepoint ls`: the table, the JSON, the marks, unreadable rows and bad roots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.table import Table
from tests.cli.cli_helpers import step_dir, table_row

from savepoint.cli.ls import build_listing, human_size, render_table


def test_table_lists_steps_metrics_and_marks(cli, llama_run: Path) -> None:
    result = cli("ls", llama_run, "--metrics", "eval_loss,lr")
    assert result.code == 0, result.err
    header = next(line for line in result.out.splitlines() if "step" in line and "eval_loss" in line)
    for column in ("time", "size", "eval_loss", "lr"):
        assert column in header
    assert "best" in table_row(result.out, "20") and "latest" not in table_row(result.out, "20")
    assert "latest" in table_row(result.out, "30") and "best" not in table_row(result.out, "30")
    row10 = table_row(result.out, "10")
    assert "latest" not in row10 and "best" not in row10 and " 2 " in row10  # eval_loss 2.0 shown as 2
    assert "1.5" in table_row(result.out, "20") and "KiB" in row10
    assert "best by eval_loss (min)" in result.out


def test_json_output(cli, llama_run: Path) -> None:
    result = cli("ls", llama_run, "--json")
    assert result.code == 0
    doc = json.loads(result.out)
    assert (doc["latest"], doc["best"], doc["best_metric"]) == (30, 20, "eval_loss")
    rows = {c["step"]: c for c in doc["checkpoints"]}
    assert sorted(rows) == [10, 20, 30]
    assert rows[20]["best"] and not rows[20]["latest"] and rows[30]["latest"]
    assert rows[10]["metrics"] == {"eval_loss": 2.0, "lr": 1e-3}
    assert all(c["readable"] and c["size"] > 0 and c["created"] > 0 for c in rows.values())


@pytest.mark.parametrize(
    ("args", "best"),
    [
        ((), None),  # no eval_loss in this run: no best mark by default
        (("--best-metric", "acc", "--best-mode", "max"), 10),
        (("--best-metric", "acc"), 5),
        (("--best-metric", "nope"), None),
    ],
)
def test_best_metric_options(cli, module_run: Path, args: tuple[str, ...], best: int | None) -> None:
    result = cli("ls", module_run, "--json", *args)
    assert result.code == 0
    doc = json.loads(result.out)
    assert doc["best"] == best
    assert doc["latest"] == 15


def test_default_without_eval_loss_says_so(cli, module_run: Path) -> None:
    result = cli("ls", module_run)
    assert "no best mark" in result.out and "--best-metric" in result.out
    assert "acc" in result.out and "best" not in table_row(result.out, "10")


def test_bad_best_mode_is_an_error(cli, module_run: Path) -> None:
    result = cli("ls", module_run, "--best-mode", "median")
    assert result.code == 2
    assert "--best-mode" in result.err


def test_damaged_manifest_is_an_unreadable_row(cli, llama_run: Path, run_copy) -> None:
    root = run_copy(llama_run)
    (step_dir(root, 30) / "savepoint.json").write_text("{not json")
    (step_dir(root, 20) / "savepoint.json").unlink()
    result = cli("ls", root)
    assert result.code == 0
    assert "unreadable" in table_row(result.out, "30") and "not valid JSON" in table_row(result.out, "30")
    assert "unreadable" in table_row(result.out, "20") and "missing" in table_row(result.out, "20")
    assert "latest" in table_row(result.out, "10") and "best" in table_row(result.out, "10")
    doc = json.loads(cli("ls", root, "--json").out)
    rows = {c["step"]: c for c in doc["checkpoints"]}
    assert not rows[30]["readable"] and "savepoint.json" in rows[30]["reason"]
    assert doc["latest"] == 10


def test_directory_renamed_to_another_step_is_unreadable(cli, module_run: Path, run_copy) -> None:
    root = run_copy(module_run)
    step_dir(root, 10).rename(step_dir(root, 11))
    row = table_row(cli("ls", root).out, "11")
    assert "unreadable" in row and "manifest says step 10" in row


def test_in_progress_and_foreign_dirs_are_not_listed(cli, module_run: Path, run_copy) -> None:
    root = run_copy(module_run)
    (root / ".tmp-step-00000020-abcd").mkdir()
    (root / "notes").mkdir()
    doc = json.loads(cli("ls", root, "--json").out)
    assert [c["step"] for c in doc["checkpoints"]] == [5, 10, 15]


def test_empty_root(cli, tmp_path: Path) -> None:
    result = cli("ls", tmp_path)
    assert result.code == 0
    assert "no checkpoints under" in result.out


def test_missing_root_exits_2(cli, tmp_path: Path) -> None:
    result = cli("ls", tmp_path / "nope")
    assert result.code == 2
    assert "does not exist" in result.err


def test_root_that_is_a_file_exits_2(cli, tmp_path: Path) -> None:
    path = tmp_path / "file.txt"
    path.write_text("x")
    result = cli("ls", path)
    assert result.code == 2
    assert "is a file" in result.err


def test_render_table_for_reuse(llama_run: Path) -> None:
    table = render_table(str(llama_run), best_metric="eval_loss", best_mode="max", wide=True)
    assert isinstance(table, Table)
    assert [c.header for c in table.columns][:5] == ["step", "time", "size", "eval_loss", "lr"]
    default = render_table(str(llama_run))
    assert [c.header for c in default.columns] == ["step", "time", "size", "eval_loss", ""]
    assert build_listing(str(llama_run), best_metric="eval_loss", best_mode="max").best == 10


@pytest.mark.parametrize(
    ("nbytes", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1536, "1.5 KiB"),
        (5 * 1024**3, "5 GiB"),
        (1010 * 1024, "1,010 KiB"),
        (3 * 1024**6, "3,072 PiB"),
    ],
)
def test_human_size(nbytes: int, text: str) -> None:
    assert human_size(nbytes) == text


# ---------------------------------------------------------------- a real Trainer's metrics at 80 columns


def _lines_fit(output: str, width: int) -> None:
    assert "…" not in output, output
    assert all(len(line) <= width for line in output.splitlines()), output


def test_default_table_of_a_trainer_run_is_readable_at_80_columns(
    cli, trainer_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    result = cli("ls", trainer_run)
    assert result.code == 0, result.err
    _lines_fit(result.out, 80)
    header = next(line for line in result.out.splitlines() if "step" in line)
    assert [c.strip() for c in header.strip("┃").split("┃")] == ["step", "time", "size", "eval_loss", ""]
    metrics = json.loads((step_dir(trainer_run, 6) / "metrics.json").read_text())
    row = table_row(result.out, "6")
    assert f"{metrics['eval_loss']:.4g}" in row and "KiB" in row and "latest" in row
    assert "eval_runtime" in result.out and "--wide" in result.out  # hidden metrics are named


def test_chosen_metrics_of_a_trainer_run_are_readable_at_80_columns(
    cli, trainer_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    result = cli("ls", trainer_run, "--metrics", "loss, eval_samples_per_second")
    assert result.code == 0, result.err
    _lines_fit(result.out, 80)
    metrics = json.loads((step_dir(trainer_run, 3) / "metrics.json").read_text())
    row = table_row(result.out, "3")
    assert f"{metrics['loss']:.4g}" in row and f"{metrics['eval_samples_per_second']:.4g}" in row


def test_wide_shows_every_metric_whole(cli, trainer_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    result = cli("ls", trainer_run, "--wide")
    assert result.code == 0, result.err
    assert "…" not in result.out
    metrics = json.loads((step_dir(trainer_run, 6) / "metrics.json").read_text())
    header = next(line for line in result.out.splitlines() if "step" in line)
    assert all(f" {name} " in header for name in metrics if name != "step")
    row = table_row(result.out, "6")
    assert all(f"{value:.4g}" in row for name, value in metrics.items() if name != "step")


@pytest.mark.parametrize(("value", "message"), [("nope", "eval_runtime"), (" , ", "separated by commas")])
def test_bad_metrics_option_is_an_error(cli, trainer_run: Path, value: str, message: str) -> None:
    result = cli("ls", trainer_run, "--metrics", value)
    assert result.code == 2
    assert message in result.err.replace("\n", " ")
