"""`savepoint demo`: the end-to-end demonstration (train, SIGKILL, resume exactly, load with transformers)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from savepoint.cli.app import app, console


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the runs, logs and export.")] = Path(
        "demo-run"
    ),
    steps: Annotated[int, typer.Option(min=20, help="Training steps of each run.")] = 150,
    kill_at: Annotated[
        int | None,
        typer.Option(help="Save step during which the run is SIGKILLed (default: 2/5 of the way)."),
    ] = None,
    save_every: Annotated[int, typer.Option(min=1, help="Checkpoint every N steps.")] = 10,
) -> None:
    """Train a tiny Llama on CPU, SIGKILL it mid-save, resume it, and show the curves are identical."""
    from savepoint.demo.run import run_demo  # imports torch and transformers: only when asked

    result = run_demo(out, steps=steps, kill_at=kill_at, save_every=save_every, console=console)
    if not result.identical:
        raise typer.Exit(code=1)
