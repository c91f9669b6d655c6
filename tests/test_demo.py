"""The demo: its resumable loader, its curve comparison, and one real end-to-end run (SIGKILL + resume)."""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch
from rich.console import Console
from torchdata.stateful_dataloader import StatefulDataLoader
from typer.testing import CliRunner

from savepoint.demo.compare import compare_runs
from savepoint.demo.data import resumable_loader
from savepoint.demo.procs import DemoError
from savepoint.demo.run import MARKER, prepare_out, run_demo
from savepoint.demo.train import TrainConfig
from savepoint.formats import stateful

# torchdata's loader calls a deprecated torch API on every iterator; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated:UserWarning")

BATCHES = 12  # 10 items, batch 3, drop_last: 3 batches an epoch, so 4 epochs


def _take(loader: StatefulDataLoader, n: int) -> list[list[int]]:
    """The demo's loop shape: `while` + `for`, so a resumed loader finishes its epoch, then goes on."""
    out: list[list[int]] = []
    while len(out) < n:
        for batch in loader:
            out.append(batch.tolist())
            if len(out) == n:
                break
    return out


def _resumes_exactly(make) -> list[int]:
    """The resume points (batches consumed before state_dict) whose continuation differs."""
    reference = _take(make(), BATCHES)
    bad = []
    for k in range(1, BATCHES):
        first = make()
        head = _take(first, k)
        second = make()
        stateful.restore(second, copy.deepcopy(stateful.capture(first)))
        if head + _take(second, BATCHES - k) != reference:
            bad.append(k)
    return bad


def test_resumable_loader_is_exact_across_epoch_boundaries_through_savepoint() -> None:
    data = list(range(10))
    assert _resumes_exactly(lambda: resumable_loader(data, batch_size=3, seed=0)) == []


def test_resumable_loader_does_not_touch_global_rng() -> None:
    loader = resumable_loader(list(range(10)), batch_size=3, seed=0)
    before = torch.get_rng_state()
    _take(loader, BATCHES)
    assert torch.equal(before, torch.get_rng_state())


def _records(losses: dict[int, float], start: int = 0) -> list[dict]:
    records: list[dict] = [{"event": "start", "step": start, "steps_per_epoch": 4}]
    for step, loss in losses.items():
        records.append({"step": step, "loss": loss})
        if step % 2 == 0:
            records.append({"event": "saving", "step": step, "eval_loss": loss / 2})
    return records


@pytest.mark.parametrize(
    ("resumed", "identical"),
    [
        ({3: 0.7, 4: 0.6, 5: 0.5, 6: 0.4}, True),
        ({3: 0.7, 4: 0.6, 5: 0.5, 6: 0.4000001}, False),  # one ulp-ish difference is a failure
        ({3: 0.7, 4: 0.6, 6: 0.4}, False),  # a missing step is a failure
    ],
)
def test_compare_runs_demands_bit_identical_curves(resumed: dict[int, float], identical: bool) -> None:
    reference = {1: 0.9, 2: 0.8, 3: 0.7, 4: 0.6, 5: 0.5, 6: 0.4}
    killed = {1: 0.9, 2: 0.8, 3: 0.7}
    result = compare_runs(
        _records(reference), _records(killed), _records(resumed, start=2), TrainConfig(steps=6)
    )
    assert result.identical is identical
    assert result.resumed_from == 2
    assert result.epoch_starts_after_resume == [5]


def test_prepare_out_never_clears_a_foreign_directory(tmp_path) -> None:
    (tmp_path / "precious.txt").write_text("mine")
    with pytest.raises(DemoError, match="not made by `savepoint demo`"):
        prepare_out(tmp_path)
    assert (tmp_path / "precious.txt").exists()


def test_cli_registers_demo() -> None:
    from savepoint.cli.app import app
    from savepoint.cli.demo import demo  # noqa: F401  (registers the command)

    result = CliRunner().invoke(app, ["demo", "--help"])
    assert result.exit_code == 0
    assert "--kill-at" in result.output


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_demo_end_to_end(tmp_path) -> None:
    out = tmp_path / "demo"
    buffer = io.StringIO()
    # 36 steps per epoch: resuming from step 10 or 20 crosses the epoch boundary at step 37.
    result = run_demo(out, steps=40, kill_at=20, save_every=10, console=Console(file=buffer, width=120))
    text = buffer.getvalue()
    assert result.identical, text
    assert "identical: yes" in text
    assert "new epochs (reshuffled data) began after the resume at steps 37" in text
    assert result.resumed_from in (10, 20)
    assert result.best_step is not None
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (out / "export" / name).is_file()
    assert (out / MARKER).is_file()
    steps = {
        json.loads(line).get("step") for line in (out / "logs" / "resumed.jsonl").read_text().splitlines()
    }
    assert set(range(result.resumed_from + 1, 41)) <= steps
    assert not list((out / "run").glob(".tmp-*"))  # the resumed run swept the half-written save
