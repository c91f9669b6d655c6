"""After the demo's training: list and verify the checkpoints, then use the best one with plain transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

import savepoint

PROMPT = "The engineer saved"


def ls_table(root: Path) -> Table:
    """The `savepoint ls` table when that command exists, else a plain listing of the same infos."""
    try:
        from savepoint.cli.ls import render_table
    except ImportError:
        pass
    else:
        return render_table(str(root))
    mgr = savepoint.CheckpointManager(str(root), best_metric="eval_loss", best_mode="min")
    table = Table(title=str(root), title_justify="left")
    for name in ("step", "eval_loss", "path"):
        table.add_column(name)
    for info in mgr.checkpoints:
        loss = info.metrics.get("eval_loss")
        mark = "  (best)" if info.step == mgr.best_step else ""
        table.add_row(str(info.step), "—" if loss is None else f"{loss:.4f}{mark}", str(info.path))
    return table


def verify_all(root: Path, console: Console) -> None:
    """Check every committed checkpoint against its manifest (raises CorruptCheckpointError if damaged)."""
    for info in savepoint.CheckpointManager(str(root)).checkpoints:
        savepoint.verify(info.path)
        console.print(f"  [green]✓[/] {Path(info.path).name} verified")


def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str = PROMPT) -> str:
    """Greedy continuation of `prompt` (20 new tokens): deterministic, so two loads can be compared."""
    inputs = tokenizer(prompt, return_tensors="pt")
    generate_ids: Any = model.generate  # typed loosely upstream (mypy sees an nn.Module attribute)
    with torch.no_grad():
        ids = generate_ids(**inputs, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return str(tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))


def showcase(out: Path, root: Path, console: Console) -> int | None:
    """ls, verify, load the best checkpoint with transformers alone, export it; returns the best step."""
    console.print()
    console.print(ls_table(root))
    console.print("\n[bold]savepoint.verify[/] on every checkpoint:")
    verify_all(root, console)
    mgr = savepoint.CheckpointManager(str(root), best_metric="eval_loss", best_mode="min")
    best = next(i for i in mgr.checkpoints if i.step == mgr.best_step)
    console.print(f"\nbest checkpoint by eval_loss: step {best.step}; loading it with plain transformers:")
    console.print(f"  AutoModelForCausalLM.from_pretrained({str(best.path)!r})")
    model = AutoModelForCausalLM.from_pretrained(str(best.path)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(best.path))
    text = generate(model, tokenizer)
    console.print(f"  [bold]{PROMPT}[/][cyan]{text}[/]", highlight=False)
    export = out / "export"
    savepoint.save_pretrained(model, str(export), tokenizer=tokenizer)
    reloaded = AutoModelForCausalLM.from_pretrained(str(export)).eval()
    same = generate(reloaded, AutoTokenizer.from_pretrained(str(export))) == text
    console.print(
        f"\nexported with savepoint.save_pretrained to {export}/; reloaded by transformers, "
        f"same generation: {'yes' if same else 'NO'}"
    )
    return best.step
