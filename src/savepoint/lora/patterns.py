"""`rank_pattern` / `alpha_pattern` matching in linear time.

peft matches each key of these config maps as a regular expression against the end of a module name
(`(.*\\.)?(KEY)$`, first match wins). The keys come from `adapter_config.json`, which whoever made the
adapter controls; Python's backtracking `re` runs some patterns (`(a+)+b` against `aaaa...c`) in time
exponential in the name's length, so a few dozen characters would stall a merge forever. RE2 (the
google-re2 binding) guarantees time linear in the input for every pattern it accepts; the few
constructs it refuses (backreferences, lookaround) have no use in a module-name pattern, and an
adapter that uses one is refused by name rather than matched differently.

    >>> pattern_value({"q_proj": 8}, "model.layers.0.self_attn.q_proj", default=4)
    8
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import re2

from savepoint.errors import MergeError

MAX_PATTERN_CHARS = 4096  # far beyond any module-name pattern; bounds compile time and memory


@functools.lru_cache(maxsize=1024)
def _compiled(key: str) -> Any:
    if len(key) > MAX_PATTERN_CHARS:
        raise MergeError(
            f"adapter_config.json: a rank/alpha pattern is {len(key)} characters long (at most "
            f"{MAX_PATTERN_CHARS}); fix or remove it"
        )
    try:
        return re2.compile(rf"(.*\.)?({key})$")
    except re2.error as exc:
        raise MergeError(
            f"adapter_config.json: the rank/alpha pattern {key!r:.200} is not a regular expression savepoint "
            f"can match in linear time ({exc}); rewrite it without backreferences or lookaround"
        ) from exc


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """The value of the first key of `patterns` matching the end of `module` (peft's rule), else `default`."""
    if not isinstance(patterns, Mapping):
        raise MergeError(
            f"adapter_config.json: rank_pattern/alpha_pattern is {type(patterns).__name__}, not an object "
            "mapping patterns to values"
        )
    for key, value in patterns.items():
        if not isinstance(key, str):
            raise MergeError(
                f"adapter_config.json: a rank/alpha pattern key is {type(key).__name__}, not text"
            )
        if _compiled(key).match(module):
            return value
    return default
