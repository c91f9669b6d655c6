"""Run under `torchrun --nproc_per_node=2` (gloo, CPU): DeepSpeed ZeRO-2 and ZeRO-3 engines with savepoint.

For each stage: trains 2 steps, saves step 2 with `model=engine` and exports with `save_pretrained`,
trains to step 4; then builds a fresh engine (other weights), restores step 2 and trains to step 4
again. Rank 0 writes `ref-zero<stage>.safetensors` (the gathered weights at step 2) and `result.json`
(losses of both runs, per rank and stage) into OUT.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported

import deepspeed
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from tests.distributed.common import write_json

import savepoint
from savepoint.demo import tiny
from savepoint.integrations.deepspeed import full_state


def build(stage: int, seed: int):
    model = tiny.tiny_llama(seed=seed).train()
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1, "torch_adam": True}},
        "scheduler": {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": 0, "warmup_max_lr": 1e-2, "warmup_num_steps": 4},
        },
        "zero_optimization": {"stage": stage},
        "steps_per_print": 1000,
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine


def train(engine, batches) -> list[float]:
    losses = []
    for ids in batches:
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def round_trip(stage: int, out: str) -> dict[str, list[float]]:
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(10 + rank)
    batches = [torch.randint(3, 512, (2, 16), generator=g) for _ in range(4)]
    mgr = savepoint.CheckpointManager(f"{out}/zero{stage}", dist_timeout=120)
    engine = build(stage, seed=0)
    train(engine, batches[:2])
    mgr.save(2, model=engine, metrics={"loss": 1.0})
    savepoint.save_pretrained(engine, f"{out}/zero{stage}-export")
    ref = {k: v.clone() for k, v in full_state(engine).items()}  # ZeRO-2: live tensors otherwise
    if rank == 0:
        save_file({k: v.contiguous() for k, v in ref.items()}, f"{out}/ref-zero{stage}.safetensors")
    first = train(engine, batches[2:])

    engine = build(stage, seed=1)  # other weights: the restore must replace them all
    assert mgr.restore(model=engine).step == 2
    restored = full_state(engine)
    if rank == 0:
        for name, tensor in ref.items():
            assert torch.equal(tensor, restored[name]), f"zero{stage}: {name} differs after restore"
    again = train(engine, batches[2:])
    return {"first": first, "again": again}


def main(out: str) -> None:
    dist.init_process_group("gloo")
    mine = {f"zero{stage}": round_trip(stage, out) for stage in (2, 3)}
    losses: list = [None, None]
    dist.all_gather_object(losses, mine)
    if dist.get_rank() == 0:
        write_json(f"{out}/result.json", losses)
    dist.barrier()
    dist.destroy_process_group()
    # Under load, interpreter shutdown once aborted ("terminate called without an active exception",
    # after result.json was written) in native threads DeepSpeed's CPU backend leaves behind; skip it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
