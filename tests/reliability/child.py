"""The process the torture harness breaks. Run with `sys.executable`, never imported by tests.

    python tests/reliability/child.py once '{"cmd": "check", ...}'   one request in a fresh interpreter
    python tests/reliability/child.py serve                          a zygote: one JSON request per line

Importing torch and transformers takes seconds, and the harness runs thousands of cases, so `serve`
imports everything once, warms the lazy imports by saving each scenario once, and then answers each
request in a `fork()`ed child. A forked child is a fresh process as far as savepoint is concerned: it
shares no open file, lock or cache with the writer it checks (the zygote never opens a test root).
`once` gives the slow, truly fresh variant, which the tests use for a sample of cases.

Requests (all carry `result`, the file the answer is written to, and `log`, where output goes):
    setup   {"scenario", "root"}                      commit the scenario's `before` checkpoints
    act     {"scenario", "root", "plan"}              run the act under a FaultPlan
    check   {"scenario", "root", "expected", "next_step"}   a fresh process's checks
    hold    {"root", "seconds", "ready"}              hold the root as a writer, then exit
    writer  {"scenario", "root", "seconds", "ready"}  save and prune in a loop (concurrency tests)
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
import traceback
import warnings
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # rayon threads and fork() do not mix
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

torch.set_num_threads(1)  # one intra-op thread: nothing is left mid-flight when the zygote forks

from tests.reliability import faults, scenarios  # noqa: E402

from savepoint.errors import SavepointError  # noqa: E402


def _act(req: dict[str, Any]) -> dict[str, Any]:
    scenario = scenarios.SCENARIOS[req["scenario"]]
    plan = faults.FaultPlan(**req["plan"])
    out: dict[str, Any] = {"ok": True}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        faults.install(plan)
        try:
            scenario.act(req["root"])
        except BaseException as exc:
            out = {
                "ok": False,
                "error_type": type(exc).__name__,
                "is_savepoint_error": isinstance(exc, SavepointError),
                "message": str(exc),
                "traceback": traceback.format_exc(limit=-6),
            }
        finally:
            out.update(faults.uninstall())
    out["warnings"] = [str(w.message) for w in caught]
    return out


def _hold(req: dict[str, Any]) -> dict[str, Any]:
    from savepoint.storage.lock import RootLock

    os.makedirs(req["root"], exist_ok=True)
    lock = RootLock(req["root"])
    lock.acquire()
    _ready(req)
    time.sleep(req["seconds"])
    if req.get("crash"):
        os._exit(faults.CRASH_EXIT_CODE)  # die holding the lock: the kernel must release it
    lock.release()
    return {"pid": os.getpid()}


def _writer(req: dict[str, Any]) -> dict[str, Any]:
    scenario = scenarios.SCENARIOS[req["scenario"]]
    deadline = time.monotonic() + req["seconds"]
    step = req.get("first_step", 1)
    from savepoint import CheckpointManager

    with CheckpointManager(req["root"], keep_last=2) as mgr:
        while time.monotonic() < deadline or step <= req.get("min_saves", 0):
            state = scenario.build(step)
            mgr.save(step, model=state.model, **state.kwargs)
            if step == req.get("first_step", 1):
                _ready(req)
            step += 1
    return {"saves": step - req.get("first_step", 1)}


def _ready(req: dict[str, Any]) -> None:
    if req.get("ready"):
        with open(req["ready"], "w") as f:
            f.write(str(os.getpid()))


HANDLERS = {
    "setup": lambda r: (
        scenarios.SCENARIOS[r["scenario"]].setup(r["root"]),
        {"listed": [i.step for i in scenarios.list_checkpoints(r["root"], warn=False)]},
    )[1],
    "act": _act,
    "check": lambda r: {
        "problems": scenarios.check_root(
            scenarios.SCENARIOS[r["scenario"]], r["root"], set(r["expected"]), next_step=r["next_step"]
        )
    },
    "hold": _hold,
    "writer": _writer,
}


def handle(req: dict[str, Any]) -> None:
    """Answer one request in this process, writing the answer to `req["result"]`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            answer = HANDLERS[req["cmd"]](req)
    except BaseException as exc:
        answer = {"crashed": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    with open(req["result"] + ".part", "w") as f:
        json.dump(answer, f)
    os.rename(req["result"] + ".part", req["result"])


def _fork_and_wait(req: dict[str, Any]) -> dict[str, Any]:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            handle(req)
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + req.get("timeout", 120)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return {"exit": os.waitstatus_to_exitcode(status)}
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return {"exit": "timeout"}
        time.sleep(0.002)


def _warm_up() -> None:
    """Save every scenario once in this process so that forked children find every import done."""
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, scenario in scenarios.SCENARIOS.items():
            if scenario.available and not scenario.manager.get("async_save"):
                root = os.path.join(tmp, name)
                scenario.save(root, 1)
                scenarios.restore_problems(scenario, root, 1, 1)


def serve() -> None:
    # savepoint's hash_file zero-fills a fresh 16 MiB buffer per file (4 ms each; reported to the lead),
    # which would make checks, not saves, dominate the run time. A smaller chunk changes nothing but
    # how many reads hash a file.
    import savepoint._hashing

    savepoint._hashing._CHUNK = 1 << 20
    _warm_up()
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing but answers goes to the protocol stream
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        if line.strip():
            out.write(json.dumps(_fork_and_wait(json.loads(line))) + "\n")
            out.flush()


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve()
    else:
        handle(json.loads(sys.argv[2]))
