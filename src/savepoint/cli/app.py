"""The typer application. Command modules register themselves on `app`; errors are printed here."""

from __future__ import annotations

import typer
from rich.console import Console

app = typer.Typer(
    name="savepoint",
    help="Crash-safe, Hugging Face-compatible training checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# emoji=False: a `:name:` code in a file or metric name stays text (cli/render.py escapes the rest).
console = Console(emoji=False)
err_console = Console(stderr=True, emoji=False)


@app.callback()
def _root() -> None:
    """Crash-safe, Hugging Face-compatible training checkpoints."""
    # An explicit callback keeps typer in multi-command mode even if only one command is registered.
