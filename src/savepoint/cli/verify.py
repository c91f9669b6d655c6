"""`savepoint verify PATH`: checksum every file of one checkpoint, or of every checkpoint under a root.

Each checkpoint goes through `savepoint.verify.verify` on its own, so one damaged checkpoint does not
hide the verdict on the others: a green line per intact checkpoint, a red line per damaged file.
Exit status: 0 all intact, 1 something damaged, 2 nothing to verify at PATH (missing, empty).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from savepoint.cli.app import app, console
from savepoint.cli.ls import human_size
from savepoint.cli.render import markup
from savepoint.discovery import STEP_DIR, check_root, is_checkpoint_dir
from savepoint.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    Problem,
)
from savepoint.manifest import read_manifest
from savepoint.storage.remote import is_remote_url
from savepoint.verify import verify


@dataclass
class Verdict:
    """The outcome for one checkpoint directory."""

    path: str
    problems: list[Problem] = field(default_factory=list)
    files: int = 0
    size: int = 0

    @property
    def intact(self) -> bool:
        return not self.problems


def checkpoints_to_verify(path: str) -> list[str]:
    """`path` itself if it is (or is named like) a checkpoint, else its `step-N` directories.

    A directory named `step-N` without a manifest is a damaged checkpoint (reported, exit 1), while
    a directory with no checkpoint at all is a wrong path (exit 2).
    """
    check_root(path, must_exist=True)
    if is_checkpoint_dir(path) or STEP_DIR.match(os.path.basename(os.path.normpath(path))):
        return [path]
    dirs = sorted(os.path.join(path, n) for n in os.listdir(path) if STEP_DIR.match(n))
    if not dirs:
        raise CheckpointNotFoundError(
            f"{path} is neither a checkpoint (no savepoint.json) nor a root holding step-N checkpoints; "
            "nothing to verify"
        )
    return dirs


def verify_one(ckpt_dir: str, *, in_root: bool = False) -> Verdict:
    """Verify one checkpoint directory; problems are named relative to it.

    `in_root`: it was found under a root, so a symlink there is reported, not followed.
    """
    if in_root and os.path.islink(ckpt_dir):
        return Verdict(ckpt_dir, [Problem("", "is a symbolic link; savepoint follows none out of a root")])
    if not os.path.isdir(ckpt_dir):
        # A file named like a checkpoint: savepoint.verify would fail with a raw NotADirectoryError.
        return Verdict(ckpt_dir, [Problem("", "is a file, not a checkpoint directory")])
    try:
        verify(ckpt_dir)
    except CorruptCheckpointError as exc:
        return Verdict(ckpt_dir, exc.problems)
    except IncompatibleCheckpointError as exc:
        # Written by a newer savepoint: its files cannot be vouched for by this version.
        return Verdict(ckpt_dir, [Problem("savepoint.json", str(exc))])
    manifest = read_manifest(ckpt_dir)
    return Verdict(ckpt_dir, files=len(manifest.files), size=manifest.total_size)


def _print_verdict(verdict: Verdict) -> None:
    name = markup(os.path.basename(os.path.normpath(verdict.path)))
    if verdict.intact:
        console.print(
            f"[green]✓ {name}: intact ({verdict.files} files, {human_size(verdict.size)})[/]", highlight=False
        )
        return
    console.print(f"[bold red]✗ {name}: damaged[/]", highlight=False)
    for problem in verdict.problems:
        where = f"{name}/{markup(problem.path)}" if problem.path else name
        console.print(f"  [red]{where}: {markup(problem.reason)}[/]", highlight=False, soft_wrap=True)


def _verify_all(dirs: list[str], root: str | None = None) -> list[Verdict]:
    # A progress bar only on a terminal: in logs and pipes it would be noise.
    if not console.is_terminal or len(dirs) < 2:
        return [verify_one(d, in_root=d != root) for d in dirs]
    verdicts = []
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"))
    with Progress(*columns, TimeRemainingColumn(), console=console, transient=True) as progress:
        task = progress.add_task("verifying", total=len(dirs))
        for d in dirs:
            progress.update(task, description=f"verifying {markup(os.path.basename(d))}")
            verdicts.append(verify_one(d, in_root=d != root))
            progress.advance(task)
    return verdicts


@app.command("verify")
def verify_command(
    path: str = typer.Argument(..., help="A checkpoint directory, or a root holding step-N checkpoints."),
) -> None:
    """Check the size and checksum of every file against the manifest, and look for unlisted files.

    Exits 0 when every checkpoint is intact, 1 when any file is damaged, missing or unlisted,
    and 2 when PATH does not exist or holds no checkpoint.
    """
    if is_remote_url(path):
        _verify_remote(path)
        return
    verdicts = _verify_all(checkpoints_to_verify(path), path)
    for verdict in verdicts:
        _print_verdict(verdict)
    damaged = [v for v in verdicts if not v.intact]
    if damaged:
        console.print(
            f"[bold red]{len(damaged)} of {len(verdicts)} checkpoint(s) damaged[/]; restore an earlier "
            "checkpoint or delete the damaged one",
            highlight=False,
        )
        raise typer.Exit(1)


def _verify_remote(url: str) -> None:
    """An object-store root or checkpoint: each checkpoint is downloaded to a temp dir and verified."""
    try:
        verified = verify(url)
    except CorruptCheckpointError as exc:
        for problem in exc.problems:
            console.print(f"  [red]{markup(problem)}[/]", highlight=False, soft_wrap=True)
        console.print(
            "[bold red]damaged[/]; restore an earlier checkpoint or delete the damaged one", highlight=False
        )
        raise typer.Exit(1) from None
    for step_url in verified:
        console.print(f"[green]✓ {markup(step_url)}: intact[/]", highlight=False)
