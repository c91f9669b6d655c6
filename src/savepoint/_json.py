"""Reading JSON that came from disk: size-capped, and every malformation becomes a savepoint error.

`json` raises more than JSONDecodeError on hostile input: RecursionError for deep nesting, a bare
ValueError for an integer literal over Python's 4300-digit limit, UnicodeDecodeError for bad bytes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from savepoint.errors import SavepointError

MAX_JSON_BYTES = 64 * 1024 * 1024  # far above any config, index or state document savepoint reads


def parse_json(raw: bytes | str, fail: Callable[[str], SavepointError]) -> Any:
    """`json.loads`, with every parse failure raised as `fail(reason)`."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # ValueError covers JSONDecodeError and UnicodeDecodeError
        raise fail(f"not valid JSON ({str(exc)[:200]})") from exc


def read_json_file(path: str | os.PathLike[str], fail: Callable[[str], SavepointError]) -> Any:
    """Read and parse a JSON file no larger than MAX_JSON_BYTES; failures raise `fail(reason)`."""
    try:
        size = os.path.getsize(path)
        if size > MAX_JSON_BYTES:
            raise fail(f"is {size} bytes, far larger than any JSON file savepoint reads")
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except OSError as exc:
        raise fail(f"unreadable ({exc.strerror or exc})") from exc
    return parse_json(raw, fail)
