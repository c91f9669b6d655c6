"""Every crash point: a save (or retention pass, or sweep) killed at its k-th file-system operation.

For each scenario the act is traced once without faults (K operations under ROOT), then rerun on a
copy of the same root and killed with `os._exit(137)` just before operation k, for every k in 1..K+1
(K+1: it ran to the end). A forked, fresh process then checks what a user would find: the listed
checkpoints are exactly those the completed renames left, each verifies and restores to its step's
values (model, optimizer, scheduler, stateful objects, RNG), `restore("latest")` gives the newest,
and the next save succeeds and leaves no debris.
"""

from __future__ import annotations

import os
import shutil

import pytest
from tests.reliability import faults
from tests.reliability.harness import FULL, Zygote, prepare, replay, run_once, sample, scenario_or_skip
from tests.reliability.scenarios import SCENARIOS, Scenario

FAST_CASES = 9  # per scenario in `make test`; `make torture` tries every k


def _commit_points(trace: list[dict]) -> list[int]:
    """Operation numbers around each rename under ROOT: where a crash is most interesting."""
    out = []
    for op in trace:
        if op["kind"] == "rename" and "/" not in op["dst"]:
            out += [op["i"] - 1, op["i"], op["i"] + 1]
    return out


def crash_case(
    zygote: Zygote, scenario: Scenario, template: str, listed: set[int], k: int, tmp: str
) -> list[str]:
    """Kill the act at operation k on a copy of `template`; return what a fresh process found wrong."""
    root = os.path.join(tmp, f"k{k:05d}")
    shutil.copytree(template, root)
    trace_path = root + ".jsonl"
    plan = faults.FaultPlan(root=root, trace=trace_path, crash_at=k)
    answer = zygote.request("act", scenario=scenario.name, root=root, plan=plan.to_json())
    trace = faults.read_trace(trace_path)
    crashed = answer["exit"] == faults.CRASH_EXIT_CODE
    problems = []
    if not crashed and not answer.get("ok"):
        problems.append(
            f"the act failed instead of crashing: {answer.get('error_type')}: {answer.get('message')}"
        )
    expected = replay(listed, trace, k if crashed else len(trace) + 1)
    # The oracle itself is held to the scenario: only the new step may appear, only deletable ones go.
    new = {scenario.new} - {None} | set(scenario.restorable)
    if not expected - listed <= new or not listed - expected <= set(scenario.deletable):
        problems.append(f"the renames done leave steps {sorted(expected)}: more than the act may change")
    if not crashed and expected != scenario.final:
        problems.append(f"ran to the end but left {sorted(expected)}, not {sorted(scenario.final)}")
    next_step = max(listed | scenario.final) + 1
    check = zygote.request(
        "check", scenario=scenario.name, root=root, expected=sorted(expected), next_step=next_step
    )
    if check["exit"] != 0:
        problems.append(f"the checking process died ({check['exit']}); see {check['log']}")
    problems += check.get("problems", [])
    if not problems:
        shutil.rmtree(root)  # keep failing roots for a post-mortem, drop the rest
    return problems


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_crash_point(name: str, zygote: Zygote, tally, torture_tmp) -> None:
    scenario = scenario_or_skip(name)
    template, trace, listed = prepare(zygote, scenario, torture_tmp)
    assert trace, "the shim saw no operation under ROOT: it is not installed where the save writes"
    points = sample(
        list(range(1, len(trace) + 2)), keep=FAST_CASES, always=_commit_points(trace), seed=len(name)
    )
    t = tally(f"crash points: {name}")
    for k in points:
        op = trace[k - 1] if k <= len(trace) else {"kind": "end", "path": ""}
        t.case(
            f"k={k}/{len(trace)} before {op['kind']} {op['path']}",
            crash_case(zygote, scenario, template, listed, k, torture_tmp),
        )
    assert not t.failures, t.report()


def test_fresh_interpreter_agrees(zygote: Zygote, tmp_path) -> None:
    """The forked checker is a fresh process for savepoint; a brand-new interpreter finds the same."""
    scenario = SCENARIOS["train-state"]
    template, trace, listed = prepare(zygote, scenario, str(tmp_path))
    commits = [op["i"] for op in trace if op["kind"] == "rename" and "/" not in op["dst"]]
    points = [commits[-1]] if not FULL else sorted({1, commits[-1], commits[-1] + 1, len(trace)})
    for k in points:
        root = os.path.join(tmp_path, f"f{k}")
        shutil.copytree(template, root)
        plan = faults.FaultPlan(root=root, trace=root + ".jsonl", crash_at=k)
        zygote.request("act", scenario=scenario.name, root=root, plan=plan.to_json())
        expected = replay(listed, faults.read_trace(root + ".jsonl"), k)
        answer = run_once(
            {
                "cmd": "check",
                "scenario": scenario.name,
                "root": root,
                "expected": sorted(expected),
                "next_step": 9,
            },
            str(tmp_path),
        )
        assert answer["exit"] == 0, answer
        assert answer["problems"] == [], answer["problems"]
