"""Render the reliability ledger (written by a run with SAVEPOINT_RELIABILITY_LEDGER=FILE) as Markdown.

    SAVEPOINT_RELIABILITY_LEDGER=/tmp/ledger.json SAVEPOINT_TORTURE=full pytest -q tests/reliability
    python -m tests.reliability.report /tmp/ledger.json > table.md
"""

from __future__ import annotations

import json
import sys


def render(rows: list[dict]) -> str:
    lines = [
        "| Fault class | Cases tried | Cases survived | Reproduce |",
        "|---|---:|---:|---|",
    ]
    for row in sorted(rows, key=lambda r: r["class"]):
        note = " (known bug, xfail)" if row["xfail"] else ""
        lines.append(f"| {row['class']}{note} | {row['tried']} | {row['survived']} | `{row['command']}` |")
    tried = sum(r["tried"] for r in rows)
    survived = sum(r["survived"] for r in rows)
    lines.append(f"| **total** | **{tried}** | **{survived}** | |")
    return "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(render(json.load(f)))
