"""`savepoint inspect PATH`: the report of cli/inspect_report.py, printed as rich tables or JSON."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import typer
from rich.table import Table

from savepoint.cli.app import app, console
from savepoint.cli.inspect_report import inspect_path
from savepoint.cli.ls import format_metric, human_size, human_time
from savepoint.cli.render import markup, text

DEFAULT_TENSOR_LIMIT = 25


# ---------------------------------------------------------------- rendering


def _kv_table(items: Mapping[str, Any]) -> Table:
    table = Table(show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in items.items():
        table.add_row(text(key), text(value if isinstance(value, str) else json.dumps(value)))
    return table


def _manifest_items(m: Mapping[str, Any]) -> dict[str, Any]:
    items: dict[str, Any] = {
        "kind": m["kind"],
        "step": str(m["step"]) if m["step"] is not None else "-",
        "created": human_time(m["created"]),
        "size": human_size(m["total_size"]),
    }
    items["metrics"] = ", ".join(f"{k}={format_metric(v)}" for k, v in m["metrics"].items()) or "-"
    items["parent"] = m["parent"] or "-"
    items["world size"] = str(m["world_size"])
    items["format version"] = str(m["format_version"])
    items["versions"] = ", ".join(f"{k} {v}" for k, v in m["versions"].items()) or "-"
    if m["base_model"]:
        items["base model"] = m["base_model"]
    return items


def _files_table(files: list[dict[str, Any]]) -> Table:
    table = Table()
    table.add_column("path", overflow="fold")
    table.add_column("size", justify="right")
    table.add_column("checksum")
    table.add_column("status", overflow="fold")
    for f in files:
        status = text("ok", "green") if f["status"] == "ok" else text(f["status"], "red")
        size = human_size(f["size"]) if f["size"] is not None else ""
        table.add_row(text(f["path"]), size, text((f["checksum"] or "-")[:12]), status)
    return table


def _tensors_table(rows: list[dict[str, Any]], limit: int | None) -> Table:
    table = Table()
    table.add_column("name", overflow="fold")
    table.add_column("dtype")
    table.add_column("shape")
    table.add_column("bytes", justify="right")
    shown = rows if limit is None else rows[:limit]
    for r in shown:
        nbytes = human_size(r["bytes"]) if r["bytes"] is not None else "?"
        table.add_row(text(r["name"]), text(r["dtype"]), text(tuple(r["shape"])), nbytes)
    if len(shown) < len(rows):
        table.add_row(f"[dim]... and {len(rows) - len(shown)} more (--all shows every tensor)[/]", "", "", "")
    return table


def _tensors_title(rel: str, rows: list[dict[str, Any]]) -> str:
    numel = sum(r["numel"] for r in rows)
    nbytes = sum(r["bytes"] or 0 for r in rows)
    return f"{markup(rel)}: {len(rows)} tensors, {numel:,} elements, {human_size(nbytes)}"


def _train_state_items(ts: Mapping[str, Any]) -> dict[str, Any]:
    items: dict[str, Any] = {}
    opt = ts["optimizer"]
    if opt is not None:
        items["optimizer"] = (
            f"{len(opt['groups'])} group(s), {opt['params']} parameters ({opt['params_with_state']} with state)"
        )
        for k, group in enumerate(opt["groups"]):
            items[f"  group {k}"] = ", ".join(f"{key}={json.dumps(v)}" for key, v in group.items())
    if ts["scheduler"] is not None:
        items["scheduler"] = (
            ", ".join(f"{k}={json.dumps(v)}" for k, v in ts["scheduler"].items()) or "present"
        )
    items["stateful"] = ", ".join(ts["stateful"]) or "-"
    items["rng ranks"] = ", ".join(map(str, ts["rng_ranks"])) or "-"
    if ts["rng_generators"]:
        items["rng generators"] = ", ".join(ts["rng_generators"])
    if ts["extra_keys"] is not None:
        items["extra"] = ", ".join(ts["extra_keys"]) or "(empty)"
    if ts["other_files"]:
        items["other files"] = ", ".join(ts["other_files"])
    return items


def render_report(report: Mapping[str, Any], *, limit: int | None = DEFAULT_TENSOR_LIMIT) -> None:
    """Print an `inspect_path` report as rich tables."""
    console.print(f"[bold]{markup(report['path'])}[/]: {markup(report['layout'])}", highlight=False)
    if "manifest" in report:
        _section("manifest", _kv_table(_manifest_items(report["manifest"])))
    if report.get("model"):
        _section("model config", _kv_table(report["model"]))
    if "adapter" in report:
        _section("LoRA adapter", _kv_table(report["adapter"]))
    if report.get("train_state"):
        _section("training state", _kv_table(_train_state_items(report["train_state"])))
    _section("files", _files_table(report["files"]))
    for rel, rows in report["tensors"].items():
        _section(_tensors_title(rel, rows), _tensors_table(rows, limit))
    for p in report["problems"]:
        console.print(
            f"[red]{markup(p['path'])}: {markup(p['reason'])}[/] (not parsed)",
            highlight=False,
            soft_wrap=True,
        )


def _section(title: str, table: Table) -> None:
    # Titles go on their own line: a rich table title would wrap at the (narrow) table's width.
    console.print(f"\n[bold cyan]{title}[/]", highlight=False, soft_wrap=True)
    console.print(table)


@app.command("inspect")
def inspect_command(
    path: str = typer.Argument(
        ..., help="A checkpoint, a model or adapter directory, or a .safetensors file."
    ),
    show_all: bool = typer.Option(
        False, "--all", help=f"Show every tensor (default: the first {DEFAULT_TENSOR_LIMIT} per file)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (always every tensor) instead of tables."),
) -> None:
    """Show what a checkpoint holds: manifest, files, tensors, training state, LoRA adapter.

    In a savepoint checkpoint every file is checksummed before it is read; damaged files are listed
    and skipped, and the exit status is 1. A directory without a manifest gets headers only.
    """
    report = inspect_path(path)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        render_report(report, limit=None if show_all else DEFAULT_TENSOR_LIMIT)
    if report["problems"]:
        raise typer.Exit(1)
