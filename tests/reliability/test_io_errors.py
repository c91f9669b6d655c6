"""Injected I/O errors: EIO, ENOSPC and EDQUOT at the k-th write, flush or fsync of a save.

The error is sticky (every later write fails too, as on a full disk). What must hold: the caller
gets a `SavepointError` that names the file and says what failed; nothing new is committed and
nothing old is lost; no temporary directory is left in ROOT; and a fresh process finds every older
checkpoint intact and can save again once the disk is back.

Writes are split by who makes them: savepoint's own (the tensors, state, manifest, directory
fsyncs) and those made by other code inside a save (transformers writing config.json and the
tokenizer's files, the root lock), so that a gap in either shows up under its own name.
"""

from __future__ import annotations

import errno
import os
import shutil

import pytest
from tests.reliability import faults
from tests.reliability.harness import FULL, Zygote, prepare, root_debris, sample, scenario_or_skip
from tests.reliability.scenarios import SCENARIOS, Scenario

ERRNOS = {"EIO": errno.EIO, "ENOSPC": errno.ENOSPC, "EDQUOT": errno.EDQUOT}
WHAT = {errno.EIO: "I/O error", errno.ENOSPC: "disk is full", errno.EDQUOT: "quota"}
FAST_CASES = 7  # per scenario in `make test` (errnos take turns); `make torture` tries all
# Files a save writes through code that is not savepoint's own storage layer.
FOREIGN = {
    ".savepoint.lock": "the root lock (storage/lock.py writes it with bare os calls)",
    "config.json": "transformers' config.save_pretrained",
    "generation_config.json": "transformers' generation_config.save_pretrained",
    "tokenizer_config.json": "the tokenizer's save_pretrained",
    "special_tokens_map.json": "the tokenizer's save_pretrained",
    "chat_template.jinja": "the tokenizer's save_pretrained",
}


def foreign(path: str) -> bool:
    return os.path.basename(path) in FOREIGN


def data_ops(trace: list[dict]) -> list[dict]:
    return [op for op in trace if op["kind"] in faults.ERROR_KINDS]


def error_case(
    zygote: Zygote, scenario: Scenario, template: str, listed: set[int], d: int, code: int, tmp: str
) -> list[str]:
    root = os.path.join(tmp, f"e{code}-{d:05d}")
    shutil.copytree(template, root)
    trace_path = root + ".jsonl"
    plan = faults.FaultPlan(root=root, trace=trace_path, error_at=d, errno=code)
    answer = zygote.request("act", scenario=scenario.name, root=root, plan=plan.to_json())
    failed = next((op for op in faults.read_trace(trace_path) if op["fail"]), None)
    problems = []
    if answer["exit"] != 0:
        return [f"the saving process died ({answer['exit']}); see {answer['log']}"]
    from savepoint.discovery import list_checkpoints

    now = {i.step for i in list_checkpoints(root, warn=False)}
    if answer["ok"]:
        # Only failures after the commit may be absorbed (a retention deletion that could not finish).
        if scenario.new is not None and scenario.new not in now:
            problems.append("the save reported success but its checkpoint does not list")
        if not answer.get("warnings") and failed is not None:
            problems.append(f"an injected {os.strerror(code)} at {failed['path']} vanished without a word")
    else:
        if not answer["is_savepoint_error"]:
            problems.append(
                f"raised {answer['error_type']} (not a SavepointError): {answer['message'][:200]}"
            )
        message = answer["message"]
        if failed and os.path.basename(failed["path"]) not in message and failed["path"] not in message:
            problems.append(
                f"the error does not name the file that failed ({failed['path']}): {message[:200]}"
            )
        if WHAT[code] not in message:
            problems.append(f"the error does not say {WHAT[code]!r}: {message[:200]}")
        # A sweep may have put back a checkpoint an interrupted replace had moved aside: a repair.
        if not listed <= now or not now - listed <= set(scenario.restorable):
            problems.append(
                f"after the failed save the root lists {sorted(now)}, before it listed {sorted(listed)}"
            )
        stale = {n for n in root_debris(template)}  # left by earlier crashes: the next sweep's job
        debris = [n for n in root_debris(root) if n.startswith(".tmp-") and n not in stale]
        if debris:
            problems.append(f"the failed save left {debris}")
    check = zygote.request(
        "check",
        scenario=scenario.name,
        root=root,
        expected=sorted(now),
        next_step=max(listed | scenario.final) + 1,
    )
    problems += check.get("problems", []) if check["exit"] == 0 else [f"the checker died: {check['log']}"]
    if not problems:
        shutil.rmtree(root)
    return problems


def run_errors(zygote: Zygote, tally, name: str, tmp: str, *, want_foreign: bool) -> None:
    scenario = scenario_or_skip(name)
    template, trace, listed = prepare(zygote, scenario, tmp)
    ops = data_ops(trace)
    points = [n for n, op in enumerate(ops, 1) if foreign(op["path"]) == want_foreign]
    if not points:
        pytest.skip(f"no {'foreign' if want_foreign else 'own'} writes in a {name} save")
    t = tally(f"I/O errors ({'foreign writers' if want_foreign else 'savepoint writes'}): {name}")
    # Full torture: every point with every errno. The sample: a few points, the errnos taking turns.
    cases = (
        [(d, e) for d in points for e in ERRNOS]
        if FULL
        else [
            (d, list(ERRNOS)[n % len(ERRNOS)])
            for n, d in enumerate(sample(points, keep=FAST_CASES, seed=len(name)))
        ]
    )
    for d, label in cases:
        op = ops[d - 1]
        code = ERRNOS[label]
        t.case(
            f"{label} at {op['kind']} #{d} {op['path']}",
            error_case(zygote, scenario, template, listed, d, code, tmp),
        )
    assert not t.failures, t.report()


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_io_errors_in_savepoint_writes(name: str, zygote: Zygote, tally, torture_tmp) -> None:
    run_errors(zygote, tally, name, torture_tmp, want_foreign=False)


@pytest.mark.parametrize("name", ["full-model", "train-state"])
def test_io_errors_in_foreign_writes(name: str, zygote: Zygote, tally, torture_tmp) -> None:
    run_errors(zygote, tally, name, torture_tmp, want_foreign=True)
