"""A trainer for the SIGKILL tests: saves step 1 and waits, then hands step 2 over and is killed.

python process_trainer.py ROOT MODE PAUSE_S WIDTH   (MODE: returned | capture | exit)
It prints "writer PID", then "saving" before save(2) and "returned" after it; in "capture" mode a
stateful object prints "capturing" inside save(2) and hangs there; in "exit" mode it exits normally
without wait(). The weights that step 2 must hold are written to ROOT/../expected.safetensors first.
"""

from __future__ import annotations

import os
import sys
import time

import safetensors.torch
import torch

import savepoint


class Hang:
    def state_dict(self) -> dict[str, int]:
        print("capturing", flush=True)
        time.sleep(120)
        return {}

    def load_state_dict(self, state: dict[str, int]) -> None:
        pass


def main() -> None:
    root, mode, pause, width = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Linear(width, width))
    opt = torch.optim.AdamW(model.parameters())
    mgr = savepoint.CheckpointManager(root, async_save="process")
    mgr.save(1, model=model, optimizer=opt)
    mgr.wait()
    print("writer", mgr._writer.pid, flush=True)
    model(torch.randn(4, width)).sum().backward()
    opt.step()
    expected = {k: v.detach().clone() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(expected, os.path.join(os.path.dirname(root), "expected.safetensors"))
    mgr._writer.pause_s = pause
    stateful = {"hang": Hang()} if mode == "capture" else None
    print("saving", flush=True)
    mgr.save(2, model=model, optimizer=opt, stateful=stateful)
    print("returned", flush=True)
    if mode == "exit":
        return  # no wait(): the exit hook waits for the writer
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # training goes on
    time.sleep(120)


if __name__ == "__main__":
    main()
