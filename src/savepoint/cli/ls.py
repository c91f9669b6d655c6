"""`savepoint ls ROOT`: the checkpoints of a run, with their metrics and the latest and best marks.

The table fits a terminal: step, time, size, the metric that ranks "best" and the marks; other metrics
(a Trainer logs a dozen: eval_runtime, eval_samples_per_second...) are named in the caption and shown
with `--metrics a,b` or `--wide`. `--json` always has them all.

Discovery only lists checkpoints whose manifest parses; `ls` also scans for `step-N` directories
discovery skipped, so a damaged checkpoint shows up as an "unreadable" row instead of vanishing.
`ls` reads manifests only: it does not checksum files (that is `savepoint verify`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any, cast

import typer
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from savepoint.cli.app import app, console
from savepoint.cli.render import markup
from savepoint.discovery import STEP_DIR, check_root, is_checkpoint_dir, list_checkpoints
from savepoint.errors import SavepointError
from savepoint.manifest import read_manifest
from savepoint.policy import BestMode, CheckpointInfo, best_step
from savepoint.storage.remote import RemoteRoot, is_remote_url

DEFAULT_BEST_METRIC = "eval_loss"
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


# ---------------------------------------------------------------- formatting helpers (shared with inspect)


def human_size(nbytes: int) -> str:
    """`1536` -> `"1.5 KiB"`: binary units, three significant digits."""
    size = float(nbytes)
    for unit in _UNITS:
        if size < 1024 or unit == _UNITS[-1]:
            if unit == "B":
                return f"{int(size)} B"
            # .3g turns 1000-1023 into exponent notation; those get whole numbers instead.
            return f"{size:.3g} {unit}" if size < 1000 else f"{size:,.0f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")  # the loop always returns on its last unit


def human_time(timestamp: float) -> str:
    """A wall-clock time in the local time zone, to the second (a time no calendar holds: as a number)."""
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))
    except (OverflowError, OSError, ValueError):  # a manifest may claim any finite number
        return f"{timestamp:.6g}"


def format_metric(value: float) -> str:
    return f"{value:.4g}"


# ---------------------------------------------------------------- scanning


@dataclass(frozen=True)
class Row:
    """One `step-N` directory under the root: a readable checkpoint (`info`) or the reason it is not."""

    step: int
    path: str
    info: CheckpointInfo | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Listing:
    """Everything `ls` shows, computed once so the table and the JSON output agree."""

    root: str
    rows: list[Row]
    metrics: list[str]
    latest: int | None
    best: int | None
    best_metric: str | None
    best_mode: BestMode


def _unreadable_reason(path: str, step: int) -> str:
    """Why discovery skipped `path` (it re-reads the manifest: discovery does not say)."""
    try:
        manifest = read_manifest(path)
    except SavepointError as exc:
        problems = getattr(exc, "problems", None)
        return str(problems[0]) if problems else str(exc).splitlines()[0]
    if manifest.step != step:
        return f"its manifest says step {manifest.step}, the directory name says {step}"
    return "unreadable"  # it became readable between the two reads (a concurrent commit)


def scan_root(root: str) -> list[Row]:
    """Every `step-N` directory under `root`, readable or not, oldest step first."""
    if is_remote_url(root):  # object stores: only prefixes with a readable manifest object are listed
        return [Row(info.step, info.path, info) for info in RemoteRoot(root).list_checkpoints(warn=False)]
    check_root(root, must_exist=True)
    readable = {info.path: info for info in list_checkpoints(root, warn=False)}
    rows = []
    for name in os.listdir(root):
        match = STEP_DIR.match(name)
        path = os.path.join(root, name)
        if not match or not os.path.isdir(path):
            continue
        step = int(match.group(1))
        if os.path.islink(path):  # never followed: it may lead out of the root
            rows.append(Row(step, path, reason="a symbolic link, not followed"))
            continue
        info = readable.get(path)
        rows.append(Row(step, path, info) if info else Row(step, path, reason=_unreadable_reason(path, step)))
    return sorted(rows, key=lambda r: r.step)


def _metric_names(infos: list[CheckpointInfo]) -> list[str]:
    """The union of metric names, in first-seen order (the order the training loop reported them)."""
    names: dict[str, None] = {}
    for info in infos:
        names.update(dict.fromkeys(info.metrics))
    return list(names)


def build_listing(root: str, *, best_metric: str | None = None, best_mode: BestMode = "min") -> Listing:
    """Scan `root` and decide the latest and best marks.

    `best_metric=None` means "eval_loss when some checkpoint reports it, else no best mark".
    """
    if best_mode not in ("min", "max"):
        raise SavepointError(f"--best-mode must be 'min' or 'max', got {best_mode!r}")
    rows = scan_root(root)
    infos = [r.info for r in rows if r.info is not None]
    metrics = _metric_names(infos)
    if best_metric is None and DEFAULT_BEST_METRIC in metrics:
        best_metric = DEFAULT_BEST_METRIC
    return Listing(
        root=root,
        rows=rows,
        metrics=metrics,
        latest=infos[-1].step if infos else None,
        best=best_step(infos, best_metric, best_mode),
        best_metric=best_metric,
        best_mode=best_mode,
    )


# ---------------------------------------------------------------- rendering


def _marks(listing: Listing, step: int) -> list[str]:
    marks = []
    if step == listing.latest:
        marks.append("latest")
    if step == listing.best:
        marks.append("best")
    return marks


def shown_metrics(listing: Listing, *, metrics: list[str] | None = None, wide: bool = False) -> list[str]:
    """The metric columns of the table: all with `wide`, those asked for, else the best metric alone."""
    if wide:
        return list(listing.metrics)
    if metrics is not None:
        unknown = [m for m in metrics if m not in listing.metrics]
        if unknown and listing.metrics:
            raise SavepointError(
                f"no checkpoint under {listing.root} reports {', '.join(map(repr, unknown))}; "
                f"--metrics takes some of: {', '.join(listing.metrics)}"
            )
        return [m for m in metrics if m in listing.metrics]
    return [listing.best_metric] if listing.best_metric in listing.metrics else []


def _caption(listing: Listing, shown: list[str]) -> str:
    if not listing.rows:
        hint = (
            " (it is itself a checkpoint: try `savepoint inspect`)" if is_checkpoint_dir(listing.root) else ""
        )
        return f"no checkpoints under {listing.root}{hint}"
    if listing.best_metric is None:
        lines = ["no best mark: no eval_loss metric (choose one with --best-metric)"]
    elif listing.best is None:
        lines = [f"no checkpoint reports metric {listing.best_metric!r}"]
    else:
        lines = [f"best by {listing.best_metric} ({listing.best_mode})"]
    hidden = [m for m in listing.metrics if m not in shown]
    if hidden:
        lines.append(f"not shown: {', '.join(hidden)} (--metrics NAME,... or --wide)")
    return "\n".join(lines)


def listing_table(listing: Listing, *, metrics: list[str] | None = None, wide: bool = False) -> Table:
    """The rich table for a computed listing, with the metric columns `shown_metrics` picks."""
    shown = shown_metrics(listing, metrics=metrics, wide=wide)
    table = Table(title=f"checkpoints in {markup(listing.root)}", caption=markup(_caption(listing, shown)))
    # Step, time and size never shrink to "…": they are what a row is read by.
    table.add_column("step", justify="right", style="bold", no_wrap=True)
    table.add_column("time", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    for name in shown:
        table.add_column(markup(name), justify="right", overflow="fold")
    table.add_column("", no_wrap=True)
    for row in listing.rows:
        if row.info is None:
            blanks = [""] * len(shown)
            table.add_row(str(row.step), "", "", *blanks, f"[red]unreadable[/]: {markup(row.reason)}")
            continue
        info = row.info
        values = [format_metric(info.metrics[m]) if m in info.metrics else "" for m in shown]
        marks = " ".join(
            f"[green]{m}[/]" if m == "latest" else f"[yellow]{m}[/]" for m in _marks(listing, row.step)
        )
        table.add_row(str(row.step), human_time(info.created), human_size(info.size), *values, marks)
    return table


def render_table(
    root: str,
    *,
    best_metric: str | None = None,
    best_mode: BestMode = "min",
    metrics: list[str] | None = None,
    wide: bool = False,
) -> Table:
    """The `savepoint ls` table for `root` (the demo reuses it).

    >>> console.print(render_table("runs/exp1", metrics=["eval_loss", "loss"]))  # doctest: +SKIP
    """
    listing = build_listing(root, best_metric=best_metric, best_mode=best_mode)
    return listing_table(listing, metrics=metrics, wide=wide)


def parse_metric_names(text: str | None) -> list[str] | None:
    """`"eval_loss, loss"` -> `["eval_loss", "loss"]` (None when the option was not given)."""
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise SavepointError(
            "--metrics needs metric names separated by commas, e.g. --metrics eval_loss,loss"
        )
    return names


def listing_json(listing: Listing) -> dict[str, Any]:
    """The machine-readable form of a listing (what `ls --json` prints)."""
    checkpoints = []
    for row in listing.rows:
        entry: dict[str, Any] = {"step": row.step, "path": row.path, "readable": row.info is not None}
        if row.info is None:
            entry["reason"] = row.reason
        else:
            entry.update(
                created=row.info.created,
                size=row.info.size,
                metrics=dict(row.info.metrics),
                latest=row.step == listing.latest,
                best=row.step == listing.best,
            )
        checkpoints.append(entry)
    return {
        "root": listing.root,
        "latest": listing.latest,
        "best": listing.best,
        "best_metric": listing.best_metric,
        "best_mode": listing.best_mode,
        "checkpoints": checkpoints,
    }


# ---------------------------------------------------------------- command


@app.command("ls")
def ls_command(
    root: str = typer.Argument(..., help="The run's root directory (holding step-N checkpoints)."),
    best_metric: str | None = typer.Option(
        None,
        "--best-metric",
        help="Metric that picks the 'best' checkpoint. Default: eval_loss when any checkpoint reports it, "
        "otherwise no best mark.",
    ),
    best_mode: str = typer.Option("min", "--best-mode", help="'min' (lower is better) or 'max'."),
    metrics: str | None = typer.Option(
        None, "--metrics", help="Metric columns to show, comma-separated (default: the best metric)."
    ),
    wide: bool = typer.Option(
        False, "--wide", help="Show every metric, at full width even past the terminal's edge."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table (every metric)."),
) -> None:
    """List the checkpoints of a run: step, time, size, the best metric, and which is latest and best.

    Damaged step directories (no readable manifest) are listed as "unreadable". Files are not
    checksummed here; run `savepoint verify` for that.
    """
    # build_listing validates the mode with a message naming the option.
    listing = build_listing(root, best_metric=best_metric, best_mode=cast(BestMode, best_mode))
    if as_json:
        typer.echo(json.dumps(listing_json(listing), indent=2))
        return
    table = listing_table(listing, metrics=parse_metric_names(metrics), wide=wide)
    if wide:  # as wide as the table wants: the terminal wraps long lines, nothing is cut to "…"
        needed = Measurement.get(console, console.options.update_width(10_000), table).maximum
        wide_console = Console(width=max(needed, console.width), force_terminal=console.is_terminal)
        wide_console.print(table, crop=False)
    else:
        console.print(table)
