"""Render the reliability ledger (written by a run with SAVEPOINT_RELIABILITY_LEDGER=FILE) as Markdown.

SAVEPOINT_RELIABILITY_LEDGER=/tmp/ledger.json SAVEPOINT_TORTURE=full pytest -q tests/reliability
python -m tests.reliability.report /tmp/ledger.json > table.md
python -m tests.reliability.report --hostile /tmp/ledger.json    # only the hostile-input classes

Every `tests/reliability/test_hostile_*.py` file feeds the ledger (conftest.py counts each test
function there as one class, each parameter as one case), so a new hostile file needs no change here.
"""

from __future__ import annotations

import json
import sys


def merge(rows: list[dict]) -> list[dict]:
    """One row per fault class (a parametrized test records one tally per parameter)."""
    out: dict[str, dict] = {}
    for row in rows:
        if row["class"] in out:
            into = out[row["class"]]
            into.update(tried=into["tried"] + row["tried"], survived=into["survived"] + row["survived"])
            into["xfail"] = into["xfail"] or row["xfail"]
            into["command"] = into["command"].split("[")[0] + ("'" if "[" in into["command"] else "")
        else:
            out[row["class"]] = dict(row)
    return list(out.values())


def render(rows: list[dict], *, hostile_only: bool = False) -> str:
    rows = merge(rows)
    if hostile_only:
        rows = [r for r in rows if r["class"].startswith("hostile: ")]
        rows = [dict(r, **{"class": r["class"].removeprefix("hostile: ")}) for r in rows]
    header = (
        "| Hostile class | Cases tried | Cases held |"
        if hostile_only
        else "| Fault class | Cases tried | Cases survived |"
    )
    lines = [f"{header} Reproduce |", "|---|---:|---:|---|"]
    for row in sorted(rows, key=lambda r: r["class"]):
        note = " (known bug, xfail)" if row["xfail"] else ""
        lines.append(f"| {row['class']}{note} | {row['tried']} | {row['survived']} | `{row['command']}` |")
    tried = sum(r["tried"] for r in rows)
    survived = sum(r["survived"] for r in rows)
    lines.append(f"| **total** | **{tried}** | **{survived}** | |")
    return "\n".join(lines)


if __name__ == "__main__":
    args = sys.argv[1:]
    hostile = "--hostile" in args
    with open(next(a for a in args if a != "--hostile")) as f:
        print(render(json.load(f), hostile_only=hostile))
