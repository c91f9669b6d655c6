"""cli/render.py: text from a checkpoint is printed inert (no markup, no terminal control)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from savepoint.cli.render import markup, plain, text


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("eval_loss", "eval_loss"),
        ("[bold red]x[/]", "[bold red]x[/]"),
        ("a\x1b[2Jb", "a\\x1b[2Jb"),
        ("bell\x07", "bell\\x07"),
        ("\u202egnp.exe", "\\u202egnp.exe"),
        ("line\nbreak", "line\\x0abreak"),
        (":warning:", ":warning:"),
        ("naïve 数据", "naïve 数据"),
    ],
)
def test_printed_exactly_as_shown(raw: str, shown: str) -> None:
    out = io.StringIO()
    console = Console(file=out, emoji=False, width=200, color_system=None)
    console.print(f"[green]{markup(raw)}[/]", highlight=False)
    console.print(text(raw))
    assert out.getvalue() == f"{shown}\n{shown}\n"


def test_newlines_may_be_kept_for_multi_line_messages() -> None:
    assert plain("a\nb\x1b", keep_newlines=True) == "a\nb\\x1b"
