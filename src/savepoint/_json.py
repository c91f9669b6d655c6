"""Reading JSON that came from disk: size-capped, and every malformation becomes a savepoint error.

`json` raises more than JSONDecodeError on hostile input: RecursionError for deep nesting, a bare
ValueError for an integer literal over Python's 4300-digit limit, UnicodeDecodeError for bad bytes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from savepoint.errors import CorruptCheckpointError, SavepointError, UnsafeCheckpointError
from savepoint.io.files import read_bytes_inside

MAX_JSON_BYTES = 64 * 1024 * 1024  # far above any config, index or state document savepoint reads


def parse_json(raw: bytes | str, fail: Callable[[str], SavepointError]) -> Any:
    """`json.loads`, with every parse failure raised as `fail(reason)`."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # ValueError covers JSONDecodeError and UnicodeDecodeError
        raise fail(f"not valid JSON ({str(exc)[:200]})") from exc


def read_json_file(
    path: str | os.PathLike[str], fail: Callable[[str], SavepointError], *, max_bytes: int = MAX_JSON_BYTES
) -> Any:
    """Read and parse a JSON file no larger than `max_bytes`; failures raise `fail(reason)`.

    The file itself is opened without following a symlink and must be a regular file (a FIFO would
    block); use `read_json_inside` when the whole path below a directory must be checked.
    """
    directory, name = os.path.split(os.fspath(path))
    return read_json_inside(directory or ".", name, fail, max_bytes=max_bytes)


def read_json_inside(
    root: str, relpath: str, fail: Callable[[str], SavepointError], *, max_bytes: int = MAX_JSON_BYTES
) -> Any:
    """Read and parse the JSON file `root/relpath`: no symlink below `root` followed, regular files only,
    at most `max_bytes`. Every failure raises `fail(reason)`; a symlink or special file keeps its
    UnsafeCheckpointError (it names the file)."""
    try:
        raw = read_bytes_inside(root, relpath, max_bytes=max_bytes)
    except UnsafeCheckpointError:
        raise
    except CorruptCheckpointError as exc:  # larger than max_bytes
        raise fail(exc.problems[0].reason if exc.problems else str(exc)) from exc
    except OSError as exc:
        raise fail(f"unreadable ({exc.strerror or exc})") from exc
    return parse_json(raw, fail)
