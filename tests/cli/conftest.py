"""Real checkpoints for the CLI tests, built once per session with the real CheckpointManager.

Tests that damage a checkpoint work on a private copy (`run_copy`), never on the shared one.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tests.cli.cli_helpers import Outcome

from savepoint import CheckpointManager
from savepoint.cli import _register_commands, main

LLAMA_STEPS = {10: 2.0, 20: 1.5, 30: 1.7}  # step -> eval_loss: 20 is best, 30 latest


class Counter:
    """A tiny stateful object, as a data loader position would be."""

    def __init__(self) -> None:
        self.position = 0

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = state["position"]


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(4, 8)
        self.fc2 = torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def _train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    ids = torch.randint(0, 128, (2, 8))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.fixture(scope="session")
def llama_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root with three Llama checkpoints (optimizer, scheduler, RNG), metrics eval_loss and lr."""
    root = tmp_path_factory.mktemp("llama") / "run"
    model = tiny_llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10)
    with CheckpointManager(root) as mgr:
        for step, loss in LLAMA_STEPS.items():
            _train_step(model, optimizer)
            scheduler.step()
            mgr.save(
                step,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                metrics={"eval_loss": loss, "lr": 1e-3},
            )
    return root


@pytest.fixture(scope="session")
def module_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root of plain nn.Module checkpoints with a stateful object and extra data; metric `acc` only."""
    root = tmp_path_factory.mktemp("module") / "run"
    torch.manual_seed(0)
    model = TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    counter = Counter()
    with CheckpointManager(root) as mgr:
        for step, acc in ((5, 0.5), (10, 0.9), (15, 0.7)):
            counter.position = step * 4
            mgr.save(step, model=model, optimizer=optimizer, stateful={"loader": counter},
                     metrics={"acc": acc}, extra={"note": "hi"})  # fmt: skip
    return root


@pytest.fixture
def run_copy(tmp_path: Path) -> Callable[[Path], Path]:
    """Copy a session run into this test's tmp_path, so the test may damage it."""

    def copy(root: Path) -> Path:
        dest = tmp_path / root.name
        shutil.copytree(root, dest)
        return dest

    return copy


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Callable[..., Outcome]:
    """Run `savepoint ARGS...` in-process through the real `main()` (so exit codes are the real ones)."""
    _register_commands()
    monkeypatch.setenv("COLUMNS", "250")  # wide enough that rich never wraps a tensor name

    def run(*args: object) -> Outcome:
        monkeypatch.setattr(sys, "argv", ["savepoint", *map(str, args)])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main()
        captured = capsys.readouterr()
        code = exit_info.value.code
        return Outcome(code if isinstance(code, int) else 1, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def trainer_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root written by a real HF Trainer through SavepointCallback: steps 3 and 6, with the Trainer's
    metrics (loss, grad_norm, learning_rate, eval_loss, eval_runtime, eval_samples_per_second...) and
    trainer_state.json in each checkpoint."""
    from tests.integrations import trainer_script

    tmp = tmp_path_factory.mktemp("trainer")
    trainer_script.train(str(tmp / "run"), str(tmp / "out"), max_steps=6)
    return tmp / "run"
