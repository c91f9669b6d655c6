"""`savepoint merge-lora` and `savepoint export`: deployable model directories from LoRA runs and checkpoints."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from savepoint.cli.app import app, console

DtypeOption = Annotated[
    str | None,
    typer.Option("--dtype", help="Cast the weights: bf16, fp16 or fp32 (default: keep the base's)."),
]
ShardOption = Annotated[
    str, typer.Option("--max-shard-size", help='Largest output shard, e.g. "5GB", "500MB".')
]


@contextmanager
def byte_progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar fed by `update(done_bytes, total_bytes)` callbacks."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


@app.command("merge-lora")
def merge_lora_command(
    adapter_dir: Annotated[
        str, typer.Argument(help="A PEFT adapter directory or a savepoint LoRA checkpoint.")
    ],
    base: Annotated[str, typer.Option("--base", help="The base model directory the adapter was trained on.")],
    out: Annotated[
        str, typer.Option("--out", help="Where to write the merged model (must not exist, or be empty).")
    ],
    dtype: DtypeOption = None,
    max_shard_size: ShardOption = "5GB",
) -> None:
    """Merge a LoRA adapter into its base: a plain transformers model directory, loadable without peft."""
    from savepoint.lora.merge import merge_lora

    with byte_progress("merging") as update:
        final = merge_lora(
            adapter_dir, base=base, out=out, dtype=dtype, max_shard_size=max_shard_size, progress=update
        )
    console.print(f"merged model written to [bold]{final}[/]")


@app.command("export")
def export_command(
    ckpt: Annotated[str, typer.Argument(help="A checkpoint directory (e.g. ROOT/step-00001200).")],
    out: Annotated[str, typer.Argument(help="Where to write the model (must not exist, or be empty).")],
    merge_lora: Annotated[
        bool, typer.Option("--merge-lora", help="Merge a LoRA run's adapter onto its base.")
    ] = False,
    base: Annotated[
        str | None,
        typer.Option(
            "--base",
            help="Base model directory. Without it, the base the checkpoint records is used only if the "
            "checkpoint also records its weights' fingerprint (checked during the merge).",
        ),
    ] = None,
    dtype: DtypeOption = None,
    max_shard_size: ShardOption = "5GB",
) -> None:
    """Write a deployable model directory from a training checkpoint, without savepoint's training state."""
    from savepoint.lora.export import export_checkpoint

    with byte_progress("exporting") as update:
        final = export_checkpoint(
            ckpt,
            out,
            merge_lora=merge_lora,
            base=base,
            dtype=dtype,
            max_shard_size=max_shard_size,
            progress=update,
        )
    console.print(f"exported to [bold]{final}[/]")
