"""`savepoint consolidate CKPT OUT`: a sharded checkpoint into a plain transformers model directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from savepoint.cli.app import app, console


@app.command()
def consolidate(
    ckpt: Annotated[
        Path, typer.Argument(help="A checkpoint saved with sharded_model=True, or a DCP directory.")
    ],
    out: Annotated[
        Path, typer.Argument(help="The model directory to write (replaced atomically if it exists).")
    ],
    max_shard_size: Annotated[
        str, typer.Option("--max-shard-size", help='Largest output shard, e.g. "5GB".')
    ] = "5GB",
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="Cast the weights: bf16, fp16 or fp32.")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="Take config.json and tokenizer files from this directory."),
    ] = None,
    trust_dcp_metadata: Annotated[
        bool,
        typer.Option(
            "--trust-dcp-metadata",
            help="Read a bare DCP directory that no savepoint manifest vouches for (only one whose origin "
            "you know; its .metadata is still read through savepoint's allow-list, never unpickled).",
        ),
    ] = False,
) -> None:
    """Gather a sharded checkpoint into HF safetensors on one machine, one output shard in memory at a time."""
    from savepoint.consolidate import consolidate as run

    def report(filename: str, done: int, total: int) -> None:
        console.print(f"  wrote {filename} ({done}/{total})", highlight=False)

    path = run(
        ckpt,
        out,
        max_shard_size=max_shard_size,
        dtype=dtype,
        config_dir=config,
        trust_metadata=trust_dcp_metadata,
        progress=report,
    )
    console.print(f"[green]consolidated[/] {ckpt} -> {path}", highlight=False)
