"""Run under `torchrun --nproc_per_node=2` (gloo, CPU): a Mixtral (experts fused in memory) trained one
step under DeepSpeed ZeRO-3 and saved with `model=engine`.

Rank 0 loads the gathered weights into a fresh Mixtral and writes it with transformers' own
`save_pretrained` into OUT/theirs, the reference for `savepoint consolidate` of the engine's files.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported

import deepspeed
import torch
import torch.distributed as dist
from tests.helpers.converted_models import BUILDERS

import savepoint
from savepoint.integrations.deepspeed import full_state

SHARD = "24KB"


def main(out: str) -> None:
    dist.init_process_group("gloo")
    model = BUILDERS["mixtral"]().train()
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": {"stage": 3},
        "steps_per_print": 1000,
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    ids = torch.randint(4, 128, (2, 12), generator=torch.Generator().manual_seed(dist.get_rank()))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    savepoint.CheckpointManager(f"{out}/run", dist_timeout=120).save(1, model=engine)
    trained = full_state(engine)  # every rank takes part; rank 0 gets the weights
    if dist.get_rank() == 0:
        reference = BUILDERS["mixtral"]()
        reference.load_state_dict(trained)
        reference.save_pretrained(f"{out}/theirs", max_shard_size=SHARD)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as worker_deepspeed.py: skip the shutdown of DeepSpeed's native CPU threads


if __name__ == "__main__":
    main(sys.argv[1])
