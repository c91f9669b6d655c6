"""`savepoint demo`: train, SIGKILL mid-save, resume, and prove the resumed run is bit-identical.

Three training processes (`savepoint.demo.train`, one CPU thread each):
  1. a reference run, never interrupted, in OUT/reference; alongside it,
  2. the same run in OUT/run, killed with SIGKILL as it starts writing the checkpoint of `kill_at`;
  3. then a fresh process on OUT/run, which resumes from the newest committed checkpoint and finishes.
Each logs its per-step losses to OUT/logs/*.jsonl; the parent compares them. Then the run's
checkpoints are listed and verified, and the best one is loaded and exported with plain transformers.

    >>> result = run_demo(Path("demo-run"), steps=150, kill_at=60)
    >>> result.identical
    True
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers.utils import logging as hf_logging

from savepoint.demo.compare import compare_runs, print_comparison
from savepoint.demo.procs import Child, DemoError, Watch
from savepoint.demo.showcase import showcase
from savepoint.demo.train import TrainConfig

MARKER = ".savepoint-demo"  # marks a directory the demo made, so a rerun may clear it


@dataclass(frozen=True)
class DemoResult:
    """What the demo found; `identical` is its verdict."""

    identical: bool
    killed_at: int
    resumed_from: int
    best_step: int | None
    seconds: float
    out: Path


def prepare_out(out: Path) -> None:
    """Create OUT, clearing it first only if an earlier demo made it (never a user's own directory)."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise DemoError(
                f"{out} exists and was not made by `savepoint demo`; pick another --out or remove it"
            )
        shutil.rmtree(out)
    (out / "logs").mkdir(parents=True)
    (out / MARKER).write_text("made by `savepoint demo`; deleted by its next run\n")


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description:<34}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[loss]}"),
        TimeElapsedColumn(),
        console=console,
    )


def run_children(out: Path, cfg: TrainConfig, kill_at: int, console: Console) -> dict[str, Child]:
    """The three training processes. The reference runs alongside the other two (one thread each)."""
    children = {
        name: Child(name, out / root, out / "logs" / f"{name}.jsonl", out / "logs" / f"{name}.out")
        for name, root in (("reference", "reference"), ("killed", "run"), ("resumed", "run"))
    }
    with _progress(console) as progress:

        def watch(name: str, label: str, kill: int | None = None) -> Watch:
            task = progress.add_task(label, total=cfg.steps, loss="")
            return Watch(children[name], cfg, progress, task, kill_at=kill)

        active = [
            watch("reference", "reference run (uninterrupted)"),
            watch("killed", f"training run (SIGKILL at step {kill_at})", kill_at),
        ]
        try:
            while active:
                for w in list(active):
                    if w.poll():
                        continue
                    active.remove(w)
                    if w.killed:
                        progress.stop_task(w.task)
                        progress.update(
                            w.task, description=f"[red]training run (SIGKILL at step {kill_at}) ✗"
                        )
                        describe_kill(w.child.root, kill_at, progress.console)
                        active.append(watch("resumed", "same run, resumed in a new process"))
                time.sleep(0.005)
        finally:
            for w in active:  # a failure in one child must not leave the others running
                w.proc.kill()
                w.proc.wait()
    if not children["resumed"].records:
        raise DemoError(
            f"the training run ended before it reached the save of step {kill_at} to be killed in"
        )
    return children


def describe_kill(root: Path, kill_at: int, console: Console) -> None:
    """What SIGKILL left on disk: committed checkpoints, and any half-written temp directory."""
    committed = sorted(p.name for p in root.glob("step-*"))
    partial = sorted(p.name for p in root.glob(".tmp-*"))
    console.print(f"[bold]SIGKILL[/] sent during the save of step {kill_at}. Left on disk in {root}:")
    console.print(f"  committed checkpoints: {', '.join(committed) or 'none'}")
    if partial:
        console.print(f"  half-written (ignored, swept on next open): {', '.join(partial)}")
    else:
        console.print("  no half-written directory left (the kill landed just before or after the commit)")


def run_demo(
    out: Path,
    *,
    steps: int = 150,
    kill_at: int | None = None,
    save_every: int = 10,
    console: Console | None = None,
) -> DemoResult:
    """Run the whole demo in `out` and return its verdict (see the module docstring)."""
    console = console or Console()
    began = time.perf_counter()
    # The loading steps below would otherwise draw transformers' own progress bars between ours.
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    # The kill lands in a save, so it must be a save step, strictly inside the run.
    kill_at = kill_at if kill_at is not None else (steps * 2 // 5)
    kill_at = max(save_every, kill_at - kill_at % save_every)
    if kill_at >= steps:
        raise DemoError(f"kill_at ({kill_at}) must be a save step before the last step ({steps})")
    cfg = TrainConfig(steps=steps, save_every=save_every)
    prepare_out(out)
    console.rule(f"[bold]savepoint demo[/]: tiny Llama, {steps} steps, checkpoint every {save_every}")
    children = run_children(out, cfg, kill_at, console)
    comparison = compare_runs(
        children["reference"].records, children["killed"].records, children["resumed"].records, cfg
    )
    print_comparison(comparison, console)
    best = showcase(out, out / "run", console)
    seconds = time.perf_counter() - began
    console.print(f"\ndemo finished in {seconds:.1f} s; everything is in {out}/")
    return DemoResult(comparison.identical, kill_at, comparison.resumed_from, best, seconds, out)
