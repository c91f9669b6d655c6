"""A tiny Accelerate training loop that checkpoints through `AcceleratorCheckpointer`, written the way
Accelerate's docs write loops: an outer epoch loop over a plain `DataLoader(shuffle=True)` (no
`generator=`), a model with dropout, so it only resumes exactly if the data order *and* the global
torch RNG come back as they were.

    python accelerate_script.py ROOT LOG --epochs 3 --save-every 2 --die-at 5        # one process
    accelerate launch --multi_gpu --num_processes 2   # CPU only: Accelerator(cpu=True) accelerate_script.py ROOT LOG

Each process appends `{"process", "step", "epoch", "loss", "rng"}` lines to LOG.process-N (`rng` is
a fingerprint of the global torch RNG after the step). `--die-at` SIGKILLs the process after that
step: a crash, unsaved work lost.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from transformers import get_cosine_schedule_with_warmup

from savepoint.demo import tiny
from savepoint.integrations.accelerate import AcceleratorCheckpointer

ROWS = 12  # batch 2: 6 steps per epoch in one process, 3 per process with two


def rng_fingerprint() -> str:
    return hashlib.sha256(torch.random.get_rng_state().numpy().tobytes()).hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("log")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--die-at", type=int)
    args = parser.parse_args()

    torch.set_num_threads(1)
    accelerator = Accelerator(
        cpu=True,
        dataloader_config=DataLoaderConfiguration(use_stateful_dataloader=True, use_seedable_sampler=True),
    )
    set_seed(0)
    model = tiny.tiny_llama(seed=0, attention_dropout=0.2).train()
    rows = torch.randint(3, tiny.DEFAULT_VOCAB_SIZE, (ROWS, 16), generator=torch.Generator().manual_seed(1))
    loader = torch.utils.data.DataLoader(rows, batch_size=2, shuffle=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 2, args.epochs * ROWS // 2)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    ckpt = AcceleratorCheckpointer(args.root, save_every=args.save_every, keep_last=2)
    state = dict(model=model, optimizer=optimizer, scheduler=scheduler, dataloader=loader)
    step = ckpt.restore(**state).step
    with open(f"{args.log}.process-{accelerator.process_index}", "a") as log:
        for epoch in range(loader.iteration, args.epochs):
            for batch in loader:
                loss = model(input_ids=batch, labels=batch).loss
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                step += 1
                record = {"process": accelerator.process_index, "step": step, "epoch": epoch}
                log.write(json.dumps(record | {"loss": loss.item(), "rng": rng_fingerprint()}) + "\n")
                log.flush()
                ckpt.maybe_save(step, **state, metrics={"loss": loss.item()})
                if step == args.die_at:
                    os.kill(os.getpid(), signal.SIGKILL)
    ckpt.manager.wait()
    accelerator.end_training()


if __name__ == "__main__":
    main()
