"""`savepoint` command line. Each module registers its commands on the shared typer app."""

from __future__ import annotations

import importlib
import sys

from savepoint.cli.app import app, err_console
from savepoint.cli.render import markup
from savepoint.errors import SavepointError

# Command modules, imported for their side effect of registering commands on `app`.
_COMMAND_MODULES = ("ls", "inspect", "verify", "lora", "demo", "consolidate", "plot")


def _register_commands() -> None:
    for name in _COMMAND_MODULES:
        try:
            importlib.import_module(f"savepoint.cli.{name}")
        except ModuleNotFoundError as exc:
            # Only a missing command module itself is tolerated; a missing dependency is a real error.
            if exc.name != f"savepoint.cli.{name}":
                raise


def main() -> None:
    _register_commands()
    try:
        app()
    except SavepointError as exc:
        err_console.print(f"[bold red]error:[/] {markup(exc, keep_newlines=True)}", highlight=False)
        sys.exit(2)
