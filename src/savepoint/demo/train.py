"""The demo's training process: a tiny Llama trained with savepoint checkpoints, resumable exactly.

The parent (`savepoint.demo.run`) starts this module as a subprocess, reads the JSON lines it writes
to `--log` (one per step, plus events), and may SIGKILL it at any moment. Started again on the same
`--root`, it resumes from the newest committed checkpoint and continues the very same run.

    python -m savepoint.demo.train --root demo-run/run --log demo-run/logs/run.jsonl --config '{"steps": 50}'
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch.optim.lr_scheduler import LRScheduler
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast, get_cosine_schedule_with_warmup

import savepoint
from savepoint.demo.data import eval_batches, resumable_loader, split_blocks, token_blocks
from savepoint.demo.tiny import load_corpus, tiny_llama, train_tokenizer


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything that defines the run; two processes with equal configs train identically."""

    steps: int = 150
    save_every: int = 10
    seed: int = 0
    seq_len: int = 64
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 10
    hidden_size: int = 64
    attention_dropout: float = 0.1
    # Same thread count in every run: CPU kernels may split reductions differently with more threads.
    threads: int = 1


@dataclass
class Run:
    """The live objects of one training process."""

    tokenizer: PreTrainedTokenizerFast
    model: LlamaForCausalLM
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    loader: StatefulDataLoader
    held_out: list[torch.Tensor]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch; a resumed run gets these streams back from the checkpoint."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_run(cfg: TrainConfig) -> Run:
    """Tokenizer, model, optimizer, schedule and data, all from `cfg` alone."""
    tokenizer = train_tokenizer(load_corpus())
    train_set, held_out = split_blocks(token_blocks(tokenizer, load_corpus(), seq_len=cfg.seq_len))
    model = tiny_llama(
        seed=cfg.seed,
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=2 * cfg.hidden_size,
        attention_dropout=cfg.attention_dropout,
    ).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
    loader = resumable_loader(train_set, batch_size=cfg.batch_size, seed=cfg.seed)
    return Run(tokenizer, model, optimizer, scheduler, loader, eval_batches(held_out, batch_size=32))


def train_step(run: Run, batch: torch.Tensor) -> float:
    """One optimizer step on `batch` (labels are the inputs: the model shifts them itself)."""
    loss = run.model(input_ids=batch, labels=batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), 1.0)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss.item()


@torch.no_grad()
def evaluate(run: Run) -> float:
    """Mean loss on the held-out rows. Eval mode switches dropout off, so no RNG is drawn here."""
    run.model.eval()
    losses = [run.model(input_ids=b, labels=b).loss.item() for b in run.held_out]
    run.model.train()
    return sum(losses) / len(losses)


def _log(stream: IO[str], **fields: Any) -> None:
    # One flushed line per record: the parent may kill us right after, and must still see it.
    stream.write(json.dumps(fields) + "\n")
    stream.flush()


def _checkpoint_state(run: Run) -> dict[str, Any]:
    """What every save writes besides the metrics: weights, training state, data position, tokenizer."""
    return {
        "model": run.model,
        "optimizer": run.optimizer,
        "scheduler": run.scheduler,
        "tokenizer": run.tokenizer,
        "stateful": {"data": run.loader},
    }


def train(root: str | Path, log_path: str | Path, cfg: TrainConfig) -> None:
    """Train to `cfg.steps`, resuming from `root` if it holds checkpoints; log each step to `log_path`."""
    torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    run = build_run(cfg)
    mgr = savepoint.CheckpointManager(
        str(root),
        save_every=cfg.save_every,
        keep_last=3,
        best_metric="eval_loss",
        best_mode="min",
        keep_best=1,
    )
    # Step 0 and nothing touched when the root is empty; else every piece of state is put back.
    step = mgr.restore(
        model=run.model, optimizer=run.optimizer, scheduler=run.scheduler, stateful={"data": run.loader}
    ).step
    metrics: dict[str, float] | None = None
    with open(log_path, "a", encoding="utf-8") as log:
        _log(log, event="start", step=step, steps_per_epoch=len(run.loader), config=asdict(cfg))
        # `while` + `for`: the loader resumes mid-epoch, then starts fresh epochs exactly as an
        # uninterrupted run does, so both runs see the same batches and draw the same random numbers.
        while step < cfg.steps:
            for batch in run.loader:
                step += 1
                _log(log, step=step, loss=train_step(run, batch), lr=run.scheduler.get_last_lr()[0])
                metrics = None
                if step % cfg.save_every == 0 or step == cfg.steps:  # maybe_save's schedule, and the end
                    metrics = {"eval_loss": evaluate(run)}
                    _log(log, event="saving", step=step, **metrics)
                mgr.maybe_save(step, **_checkpoint_state(run), metrics=metrics)
                if step == cfg.steps:
                    break
        if mgr.latest_step != cfg.steps:  # a run whose length is off the schedule still ends saved
            mgr.save(cfg.steps, **_checkpoint_state(run), metrics=metrics)
        _log(log, event="done", step=step)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="checkpoint root of this run")
    parser.add_argument("--log", required=True, help="JSON-lines file the steps are appended to")
    parser.add_argument("--config", default="{}", help="TrainConfig fields as a JSON object")
    args = parser.parse_args(argv)
    train(args.root, args.log, TrainConfig(**json.loads(args.config)))


if __name__ == "__main__":
    main()
