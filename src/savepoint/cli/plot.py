"""`savepoint plot ROOT --metric eval_loss [--out PNG]`: a metric across the checkpoints of a run.

Reads manifests only (like `ls`), so it works on local roots and fsspec URLs alike. The best
checkpoint by the metric and the latest one are marked. Drawn with matplotlib's Agg backend: no
display needed.
"""

from __future__ import annotations

from typing import cast

import typer

from savepoint.cli.app import app, console
from savepoint.cli.render import markup
from savepoint.discovery import list_checkpoints
from savepoint.errors import CheckpointNotFoundError, SavepointError
from savepoint.policy import BestMode, CheckpointInfo, best_step
from savepoint.storage.remote import RemoteRoot, is_remote_url


def checkpoints_of(root: str) -> list[CheckpointInfo]:
    if is_remote_url(root):
        return RemoteRoot(root).list_checkpoints(warn=False)
    return list_checkpoints(root, warn=False)


def plot_metric(root: str, metric: str, out: str, *, best_mode: BestMode = "min") -> str:
    """Draw `metric` per checkpoint step to the PNG `out`, marking best and latest; return `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    infos = checkpoints_of(root)
    if not infos:
        raise CheckpointNotFoundError(f"no checkpoints under {root}")
    points = [(i.step, i.metrics[metric]) for i in infos if metric in i.metrics]
    if not points:
        known = sorted({m for i in infos for m in i.metrics}) or ["none"]
        raise SavepointError(
            f"no checkpoint under {root} reports {metric!r}; metrics found: {', '.join(known)}"
        )
    steps, values = zip(*points, strict=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, values, marker="o", markersize=3, label=metric)
    best = best_step(infos, metric, best_mode)
    if best is not None:
        ax.scatter(
            [best],
            [dict(points)[best]],
            s=160,
            marker="*",
            color="tab:orange",
            zorder=3,
            label=f"best (step {best})",
        )
    latest = infos[-1]
    if metric in latest.metrics:
        ax.scatter(
            [latest.step],
            [latest.metrics[metric]],
            s=90,
            facecolors="none",
            edgecolors="tab:green",
            linewidths=2,
            zorder=3,
            label=f"latest (step {latest.step})",
        )
    ax.set(xlabel="step", ylabel=metric, title=f"{metric} across checkpoints of {root}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


@app.command("plot")
def plot_command(
    root: str = typer.Argument(
        ..., help="The run's root (a directory or an fsspec URL such as s3://bucket/run)."
    ),
    metric: str = typer.Option("eval_loss", "--metric", help="The metric to draw."),
    out: str | None = typer.Option(None, "--out", help="PNG file to write. Default: METRIC.png here."),
    best_mode: str = typer.Option(
        "min", "--best-mode", help="'min' (lower is better) or 'max': which point is best."
    ),
) -> None:
    """Draw a metric across the checkpoints of a run to a PNG, marking the best and the latest."""
    if best_mode not in ("min", "max"):
        raise SavepointError(f"--best-mode must be 'min' or 'max', got {best_mode!r}")
    path = plot_metric(root, metric, out or f"{metric}.png", best_mode=cast(BestMode, best_mode))
    console.print(f"wrote {markup(path)}", highlight=False)
