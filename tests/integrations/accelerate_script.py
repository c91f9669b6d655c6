"""A tiny Accelerate training loop that checkpoints through `AcceleratorCheckpointer`.

    python accelerate_script.py ROOT LOG --steps 12 --stop-at 7           # one process
    accelerate launch --multi_gpu --num_processes 2   # CPU only: Accelerator(cpu=True) accelerate_script.py ROOT LOG --steps 12

Each process appends `{"process", "step", "loss"}` lines to LOG.process-N. `--stop-at` ends the
process abruptly (os._exit) after that step, unsaved work lost, like a crash.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from transformers import get_cosine_schedule_with_warmup

from savepoint.demo import tiny
from savepoint.integrations.accelerate import AcceleratorCheckpointer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("log")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--save-every", type=int, default=3)
    parser.add_argument("--stop-at", type=int)
    args = parser.parse_args()

    torch.set_num_threads(1)
    accelerator = Accelerator(
        cpu=True,
        dataloader_config=DataLoaderConfiguration(use_stateful_dataloader=True, use_seedable_sampler=True),
    )
    set_seed(0)
    model = tiny.tiny_llama(seed=0, attention_dropout=0.2).train()
    rows = torch.randint(3, tiny.DEFAULT_VOCAB_SIZE, (20, 16), generator=torch.Generator().manual_seed(1))
    loader = torch.utils.data.DataLoader(
        rows, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(2)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 2, args.steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    ckpt = AcceleratorCheckpointer(args.root, save_every=args.save_every, keep_last=2)
    state = dict(model=model, optimizer=optimizer, scheduler=scheduler, dataloader=loader)
    step = ckpt.restore(**state).step
    with open(f"{args.log}.process-{accelerator.process_index}", "a") as log:
        while step < args.steps:
            for batch in loader:
                loss = model(input_ids=batch, labels=batch).loss
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                step += 1
                log.write(
                    json.dumps({"process": accelerator.process_index, "step": step, "loss": loss.item()})
                    + "\n"
                )
                log.flush()
                ckpt.maybe_save(step, **state, metrics={"loss": loss.item()})
                if step == args.stop_at:
                    os._exit(0)
                if step == args.steps:
                    break
        if ckpt.manager.latest_step != args.steps:
            ckpt.save(args.steps, **state)
    accelerator.end_training()


if __name__ == "__main__":
    main()
