"""Fixtures for the reliability suite: the zygote that runs broken saves, and the tally of cases.

`SAVEPOINT_TORTURE=full` enumerates every fault point (`make torture`); otherwise each class runs a
sample. `SAVEPOINT_RELIABILITY_LEDGER=FILE` writes every class's counts to FILE as JSON, from which
`python -m tests.reliability.report FILE` renders the table in RELIABILITY.md.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.reliability.harness import FULL, Tally, Zygote
from tests.reliability.hostile_helpers import plant_secret
from tests.reliability.scenarios import train_state

import savepoint

_TALLIES: list[Tally] = []


@pytest.fixture(autouse=True)
def _quiet(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="session")
def zygote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zygote]:
    z = Zygote(str(tmp_path_factory.mktemp("zygote")))
    yield z
    z.close()


@pytest.fixture
def run(tmp_path: Path) -> str:
    """A root with one committed train-state checkpoint (step 1)."""
    root = str(tmp_path / "run")
    state = train_state(1)
    with savepoint.CheckpointManager(root) as mgr:
        mgr.save(1, model=state.model, **state.kwargs)
    return root


@pytest.fixture
def torture_tmp(tmp_path: pytest.TempPathFactory) -> Iterator[str]:
    """A scratch directory on tmpfs when there is one: thousands of saves fsync, and on a real disk
    each fsync costs milliseconds. Process crashes (what the harness simulates) do not depend on it."""
    shm = "/dev/shm"
    if not (os.path.isdir(shm) and os.access(shm, os.W_OK)):
        yield str(tmp_path)
        return
    path = tempfile.mkdtemp(prefix="savepoint-torture-", dir=shm)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def tally(request: pytest.FixtureRequest) -> Iterator[callable]:
    """`tally(fault_class)` gives a Tally recorded in the session ledger under this test's node id."""
    made: list[Tally] = []

    def make(fault_class: str, *, xfail: bool = False) -> Tally:
        env = "SAVEPOINT_TORTURE=full " if FULL else ""
        t = Tally(fault_class, f"{env}.venv/bin/python -m pytest -q '{request.node.nodeid}'", xfail=xfail)
        made.append(t)
        return t

    yield make
    _TALLIES.extend(made)


_HOSTILE: dict[str, Tally] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Count each hostile-input test (one case per parameter) into the ledger, by function.

    Every `tests/reliability/test_hostile_*.py` file counts; each test function is one class.
    """
    if "/test_hostile_" not in report.nodeid or report.when != "call":
        return
    path, func = report.nodeid.split("::")[0], report.nodeid.split("::")[-1].split("[")[0]
    env = "SAVEPOINT_TORTURE=full " if FULL else ""
    t = _HOSTILE.get(f"{path}::{func}")
    if t is None:
        t = _HOSTILE[f"{path}::{func}"] = Tally(
            f"hostile: {func.removeprefix('test_')}",
            f"{env}.venv/bin/python -m pytest -q '{path}::{func}'",
            xfail=False,
        )
        _TALLIES.append(t)
    xfailed = hasattr(report, "wasxfail")
    t.xfail = t.xfail or xfailed
    t.case(report.nodeid, [] if report.passed and not xfailed else [report.longreprtext[:200] or "xfail"])


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = os.environ.get("SAVEPOINT_RELIABILITY_LEDGER")
    if path and _TALLIES:
        rows = [
            {
                "class": t.fault_class,
                "tried": t.tried,
                "survived": t.survived,
                "command": t.command,
                "xfail": t.xfail,
                "failures": t.failures[:20],
                "mode": "full" if FULL else "sample",
            }
            for t in _TALLIES
        ]
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _TALLIES:
        terminalreporter.section("reliability: cases survived / tried")
        for t in _TALLIES:
            mark = " (known bug, xfail)" if t.xfail else ""
            terminalreporter.write_line(f"{t.survived:6d} / {t.tried:<6d} {t.fault_class}{mark}")


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A file outside every checkpoint whose bytes must never change nor be read into an output."""
    return plant_secret(tmp_path)
