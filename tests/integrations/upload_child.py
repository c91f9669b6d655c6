"""Child process for test_remote: saves step 1 to an S3 root, then dies by SIGKILL in the middle of
uploading step 2, after `--after` objects of it reached the server.

    python upload_child.py s3://bucket/run --after 2
"""

from __future__ import annotations

import argparse
import os
import signal

import torch

import savepoint
from savepoint.storage.remote import RemoteRoot


def model_and_optimizer(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    return model, optimizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("--after", type=int, required=True)
    args = parser.parse_args()
    model, optimizer = model_and_optimizer(seed=1)
    mgr = savepoint.CheckpointManager(args.root, async_save=True)
    mgr.save(1, model=model, optimizer=optimizer, metrics={"loss": 1.0})
    mgr.wait()

    put, done = RemoteRoot._put, []

    def put_then_die(self: RemoteRoot, local: str, key: str) -> None:
        if len(done) == args.after:
            os.kill(os.getpid(), signal.SIGKILL)
        put(self, local, key)
        done.append(key)

    RemoteRoot._put = put_then_die  # type: ignore[method-assign]
    model2, optimizer2 = model_and_optimizer(seed=2)
    mgr.save(2, model=model2, optimizer=optimizer2, metrics={"loss": 0.5})
    mgr.wait()
    raise SystemExit("unreachable: the upload should have been killed")


if __name__ == "__main__":
    main()
