"""Compare the demo's loss curves: does the resumed run continue the reference run bit for bit?"""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from savepoint.demo.train import TrainConfig

Curve = dict[int, float]


@dataclass(frozen=True)
class Comparison:
    """Per-step losses of the three runs and the verdicts drawn from them."""

    reference: Curve
    killed: Curve
    resumed: Curve
    resumed_from: int
    steps: int
    steps_per_epoch: int
    killed_matches: bool  # the killed run, up to its death, equals the reference (same seed, same code)
    resumed_matches: bool  # every resumed step equals the reference, and none is missing
    evals_match: bool  # eval losses logged at saves agree too

    @property
    def identical(self) -> bool:
        return self.killed_matches and self.resumed_matches and self.evals_match

    @property
    def epoch_starts_after_resume(self) -> list[int]:
        """Steps that begin a new epoch in the resumed process (the loader's hardest case)."""
        spe = self.steps_per_epoch
        return [s for s in range(self.resumed_from + 1, self.steps + 1) if spe and (s - 1) % spe == 0]


def curve(records: list[dict]) -> Curve:
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def evals(records: list[dict]) -> Curve:
    return {r["step"]: r["eval_loss"] for r in records if r.get("event") == "saving"}


def _start(records: list[dict]) -> dict:
    return next(r for r in records if r.get("event") == "start")


def _equal_on(a: Curve, b: Curve, steps: list[int]) -> bool:
    # `==` on floats parsed from the same JSON repr: exact, bit for bit, no tolerance.
    return all(s in a and s in b and a[s] == b[s] for s in steps)


def compare_runs(
    reference: list[dict], killed: list[dict], resumed: list[dict], cfg: TrainConfig
) -> Comparison:
    """Line up the three runs' logs (JSON records written by `savepoint.demo.train`)."""
    ref, kil, res = curve(reference), curve(killed), curve(resumed)
    start = _start(resumed)
    resumed_steps = list(range(start["step"] + 1, cfg.steps + 1))
    ref_evals, res_evals = evals(reference), evals(resumed)
    return Comparison(
        reference=ref,
        killed=kil,
        resumed=res,
        resumed_from=start["step"],
        steps=cfg.steps,
        steps_per_epoch=start.get("steps_per_epoch", 0),
        killed_matches=bool(kil) and _equal_on(kil, ref, sorted(kil)),
        resumed_matches=sorted(res) == resumed_steps and _equal_on(res, ref, resumed_steps),
        evals_match=bool(res_evals) and _equal_on(res_evals, ref_evals, sorted(res_evals)),
    )


def _rows(c: Comparison) -> list[int]:
    """A few telling steps: around the resume point, the kill, epoch starts, and the end."""
    around = [c.resumed_from - 1, c.resumed_from, c.resumed_from + 1, c.resumed_from + 2]
    epochs = [s for e in c.epoch_starts_after_resume[:2] for s in (e - 1, e)]
    kill = max(c.killed) if c.killed else 0
    picked = {s for s in [*around, kill, *epochs, c.steps - 1, c.steps] if 1 <= s <= c.steps}
    return sorted(picked)


def _fmt(curve: Curve, step: int) -> str:
    return f"{curve[step]:.9f}" if step in curve else "—"


def print_comparison(c: Comparison, console: Console) -> None:
    """The loss table and the explicit verdict lines."""
    table = Table(title="per-step training loss (selected steps)", title_justify="left")
    for name in ("step", "reference", "killed run", "resumed run", "same?"):
        table.add_column(name, justify="right")
    for s in _rows(c):
        others = [x[s] for x in (c.killed, c.resumed) if s in x]
        same = all(v == c.reference.get(s) for v in others) if others else None
        mark = "—" if same is None else ("[green]yes[/]" if same else "[red]NO[/]")
        note = "  (resumed from here)" if s == c.resumed_from else ""
        table.add_row(f"{s}{note}", _fmt(c.reference, s), _fmt(c.killed, s), _fmt(c.resumed, s), mark)
    console.print()
    console.print(table)
    n = c.steps - c.resumed_from
    console.print(
        f"resumed from the checkpoint of step {c.resumed_from}; the new process ran steps "
        f"{c.resumed_from + 1}..{c.steps} ({n} steps)"
    )
    if c.epoch_starts_after_resume:
        starts = ", ".join(map(str, c.epoch_starts_after_resume))
        console.print(f"new epochs (reshuffled data) began after the resume at steps {starts}")
    _verdict(console, "killed run equals the reference up to the kill", c.killed_matches)
    _verdict(console, f"all {n} resumed losses equal the reference, bit for bit", c.resumed_matches)
    _verdict(console, "eval losses at every resumed save equal the reference", c.evals_match)
    colour = "green" if c.identical else "red"
    console.print(f"[bold {colour}]identical: {'yes' if c.identical else 'NO'}[/]")


def _verdict(console: Console, text: str, ok: bool) -> None:
    console.print(f"  {'[green]✓[/]' if ok else '[red]✗[/]'} {text}")
