"""Small helpers shared by the CLI tests: damaging files on purpose, finding table rows."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Outcome:
    """What one `savepoint ...` invocation did."""

    code: int
    out: str
    err: str


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Invert one byte (by default in the middle of the file): same size, different checksum."""
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path, nbytes: int = 100) -> None:
    os.truncate(path, path.stat().st_size - nbytes)


def table_row(output: str, first_cell: str) -> str:
    """The line of a rich table whose first cell is `first_cell`."""
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip("│┃").split("│")]
        if cells and cells[0] == first_cell:
            return line
    raise AssertionError(f"no table row starting with {first_cell!r} in:\n{output}")
