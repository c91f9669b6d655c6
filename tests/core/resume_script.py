"""A training run for the exact-resume tests, run as a real subprocess.

    python resume_script.py ROOT LOG --total 20 --save-every 6 [--die-at 10]

It trains a tiny Llama with dropout on a shuffled StatefulDataLoader, draws python and numpy random
numbers in the loop, checkpoints through savepoint, resumes from the latest checkpoint on start, and
SIGKILLs itself right after step `--die-at` (a real, uncatchable kill, not an exception).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal

import numpy as np
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

import savepoint
from savepoint.demo import tiny

DATASET_SIZE, BATCH = 24, 4  # 6 batches per epoch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("log")
    parser.add_argument("--total", type=int, default=20)
    parser.add_argument("--save-every", type=int, default=6)
    parser.add_argument("--die-at", type=int, default=None)
    args = parser.parse_args()

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    model = tiny.tiny_llama(seed=0, attention_dropout=0.2)
    model.train()
    data = torch.randint(
        0, model.config.vocab_size, (DATASET_SIZE, 12), generator=torch.Generator().manual_seed(1)
    )
    loader = StatefulDataLoader(
        data, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(2)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.1 * s))
    mgr = savepoint.CheckpointManager(args.root, save_every=args.save_every, keep_last=2)
    state = {"model": model, "optimizer": opt, "scheduler": sched, "stateful": {"data": loader}}
    step = mgr.restore(**state).step

    with open(args.log, "a") as log:
        while step < args.total:
            for batch in loader:
                step += 1
                # python and numpy randomness that the loss depends on, as augmentation would
                scale = 1.0 + 0.01 * random.random() + 0.01 * float(np.random.rand())
                loss = model(input_ids=batch, labels=batch).loss * scale
                loss.backward()
                opt.step()
                opt.zero_grad()
                sched.step()
                log.write(json.dumps({"step": step, "loss": loss.item()}) + "\n")
                log.flush()
                mgr.maybe_save(step, **state, metrics={"loss": loss.item()})
                if step == args.die_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                if step == args.total:
                    break
    mgr.save(args.total, **state)
    mgr.close()


if __name__ == "__main__":
    main()
