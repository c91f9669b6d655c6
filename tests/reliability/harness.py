"""The parent side of the torture harness: talks to the zygote, enumerates fault points, judges.

The judge never trusts the writer. For a crash at operation k it replays the renames the writer's
trace says completed (operations 1..k-1) over the names in ROOT: a `step-N` directory exists exactly
when the last rename that touched that name put it there. That is the set a fresh process must list,
and every one of them must verify and restore to the values saved at its step.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest
from tests.reliability import faults
from tests.reliability.scenarios import SCENARIOS, Scenario

from savepoint.discovery import STEP_DIR, list_checkpoints

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "child.py")
FULL = os.environ.get("SAVEPOINT_TORTURE", "").lower() == "full"


def sample(points: list[int], *, keep: int, always: Iterable[int] = (), seed: int = 0) -> list[int]:
    """All `points` in full torture mode; otherwise the first and last few, `always`, and a random rest."""
    if FULL or len(points) <= keep:
        return list(points)
    chosen = set(points[:3]) | set(points[-3:]) | (set(always) & set(points))
    rest = [p for p in points if p not in chosen]
    chosen |= set(random.Random(seed).sample(rest, max(0, min(len(rest), keep - len(chosen)))))
    return sorted(chosen)


class Zygote:
    """A `child.py serve` process; each request runs in a process forked from it."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self._log = open(os.path.join(workdir, "zygote.log"), "w")  # noqa: SIM115 (lives with the process)
        self.proc = subprocess.Popen(
            [sys.executable, CHILD, "serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
        )
        self._n = 0
        self._mutex = threading.Lock()
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            raise RuntimeError(f"the zygote did not start; see {workdir}/zygote.log")

    def request(self, cmd: str, *, timeout: float = 120, **fields: Any) -> dict[str, Any]:
        """Run one request in a forked child; return its answer plus `exit` (137 after a crash)."""
        with self._mutex:
            self._n += 1
            base = os.path.join(self.workdir, f"req-{self._n:06d}")
            req = {"cmd": cmd, "result": base + ".json", "log": base + ".log", "timeout": timeout, **fields}
            assert self.proc.stdin and self.proc.stdout
            self.proc.stdin.write(json.dumps(req) + "\n")
            status = json.loads(self.proc.stdout.readline())
        answer: dict[str, Any] = {}
        if os.path.exists(req["result"]):
            with open(req["result"]) as f:
                answer = json.load(f)
        answer["exit"] = status["exit"]
        answer["log"] = req["log"]
        if "crashed" in answer:
            raise RuntimeError(f"harness request {cmd} failed in the child: {answer['traceback']}")
        return answer

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)
        if self.proc.stdout:
            self.proc.stdout.close()
        self._log.close()


def run_once(request: dict[str, Any], workdir: str, *, timeout: float = 300) -> dict[str, Any]:
    """Run one request in a brand-new interpreter (`child.py once`), the slow, fully fresh way."""
    result = os.path.join(workdir, f"once-{random.getrandbits(32):08x}.json")
    req = {"result": result, "log": result + ".log", **request}
    proc = subprocess.run(
        [sys.executable, CHILD, "once", json.dumps(req)], capture_output=True, text=True, timeout=timeout
    )
    answer: dict[str, Any] = {"exit": proc.returncode, "stderr": proc.stderr[-4000:]}
    if os.path.exists(result):
        with open(result) as f:
            answer.update(json.load(f))
    return answer


# ---------------------------------------------------------------- judging


def replay(initial: set[int], trace: list[dict[str, Any]], upto: int) -> set[int]:
    """The steps whose `step-N` directory exists after operations 1..upto-1 of `trace` completed."""
    present = set(initial)
    for op in trace:
        if op["i"] >= upto or op["kind"] != "rename":
            continue
        for name, add in ((op["path"], False), (op["dst"], True)):
            match = STEP_DIR.match(name)  # only renames directly under ROOT change what is listed
            if match:
                (present.add if add else present.discard)(int(match.group(1)))
    return present


def root_debris(root: str) -> list[str]:
    return sorted(n for n in os.listdir(root) if n.startswith((".tmp-", ".del-", ".old-")))


@dataclass
class Tally:
    """Cases tried and the failures among them, for one fault class."""

    fault_class: str
    command: str
    tried: int = 0
    failures: list[str] = field(default_factory=list)
    xfail: bool = False

    def case(self, label: str, problems: list[str]) -> None:
        self.tried += 1
        if problems:
            self.failures.append(f"{label}: " + "; ".join(problems[:4]))

    @property
    def survived(self) -> int:
        return self.tried - len(self.failures)

    def report(self) -> str:
        return f"{self.fault_class}: {self.survived}/{self.tried} survived\n" + "\n".join(self.failures[:30])


def scenario_or_skip(name: str) -> Scenario:
    scenario = SCENARIOS[name]
    if not scenario.available:
        pytest.skip(f"{scenario.requires} does not exist yet; the scenario runs once it does")
    return scenario


def prepare(zygote: Zygote, scenario: Scenario, tmp: str) -> tuple[str, list[dict], set[int]]:
    """The root as setup leaves it (kept pristine), the fault-free trace of the act, and the listing."""
    template = os.path.join(tmp, "template")
    zygote.request("setup", scenario=scenario.name, root=template)
    dry = os.path.join(tmp, "dry")
    shutil.copytree(template, dry)
    trace, _ = trace_act(zygote, scenario, dry, tmp)
    listed = {i.step for i in list_checkpoints(template, warn=False)}
    shutil.rmtree(dry)
    return template, trace, listed


def trace_act(zygote: Zygote, scenario: Scenario, root: str, tmp: str) -> tuple[list[dict], dict]:
    trace_path = os.path.join(tmp, "dry.jsonl")
    plan = faults.FaultPlan(root=root, trace=trace_path)
    answer = zygote.request("act", scenario=scenario.name, root=root, plan=plan.to_json())
    assert answer.get("ok"), f"the fault-free act failed: {answer}"
    return faults.read_trace(trace_path), answer
