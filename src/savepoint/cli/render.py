"""Printing what a checkpoint says, safely: the one place the CLI escapes text that came from a file.

Everything a checkpoint holds is the choice of whoever made it (DESIGN.md, promise 4): file names,
kinds, metric names, config values, error messages that quote them. Printed raw, `[red]...` would be
read as rich markup and an ESC byte would reach the terminal as a control sequence (moving the cursor,
rewriting earlier lines, setting the window title). So every such value goes through `markup()` (when
embedded in a markup string) or `text()` (a table cell), which show control and invisible formatting
characters as `\\xNN` / `\\uNNNN` and escape markup. The consoles are built with `emoji=False`, so
`:name:` codes in a name stay text too.

    console.print(f"[red]{markup(problem.path)}: {markup(problem.reason)}[/]")
"""

from __future__ import annotations

import unicodedata

from rich.markup import escape
from rich.text import Text

# Cc: C0/C1 controls and DEL; Cf: invisible formatting (bidi overrides that reorder what is shown);
# Zl/Zp: line and paragraph separators.
_UNSAFE_CATEGORIES = {"Cc", "Cf", "Zl", "Zp"}


def _shown(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def plain(value: object, *, keep_newlines: bool = False) -> str:
    """`str(value)` with every control or invisible formatting character shown as an escape."""
    s = str(value)
    if s.isprintable():  # the common case: nothing to replace
        return s
    return "".join(
        ch
        if (keep_newlines and ch == "\n") or unicodedata.category(ch) not in _UNSAFE_CATEGORIES
        else _shown(ch)
        for ch in s
    )


def markup(value: object, *, keep_newlines: bool = False) -> str:
    """`value` made safe to embed in a rich markup string: controls shown, markup escaped."""
    return escape(plain(value, keep_newlines=keep_newlines))


def text(value: object, style: str = "") -> Text:
    """`value` as a rich Text cell: never parsed as markup, controls shown."""
    return Text(plain(value), style=style)
