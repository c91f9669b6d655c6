"""Run under `torchrun --nproc_per_node=1` (gloo, CPU): planted pickles on every route by which a
DeepSpeed restore reads a checkpoint, each built as an attacker would (manifest rewritten to match).

Saves a ZeRO-2 engine's step 1 under OUT/root, then for each route copies the checkpoint, plants a
torch file whose unpickling creates a sentinel file, and restores into a fresh engine. Writes
OUT/result.json: per route, the error raised, whether the sentinel exists, whether the engine's
weights changed. OUT/root/step-00000001 stays intact for the consolidation tests.
"""

from __future__ import annotations

import os
import shutil
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported

import deepspeed
import torch
import torch.distributed as dist
from tests.distributed.common import write_json
from tests.reliability.test_hostile_inputs import Bomb, relist

import savepoint
from savepoint.demo import tiny
from savepoint.errors import SavepointError

TAG_DIR = "train_state/deepspeed/global_step1"


def build(seed: int, **config_extra: object):
    model = tiny.tiny_llama(seed=seed).train()
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": {"stage": 2},
        "steps_per_print": 1000,
        **config_extra,
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine


def attempt(root: str, out: str, name: str, **config_extra: object) -> dict[str, object]:
    engine = build(seed=1, **config_extra)
    before = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    error = None
    try:
        savepoint.CheckpointManager(root, dist_timeout=60).restore(model=engine, step=1)
    except SavepointError as exc:
        error = f"{type(exc).__name__}: {exc}"
    after = engine.module.state_dict()
    return {
        "error": error,
        "sentinel": os.path.exists(f"{out}/{name}.pwned"),
        "unchanged": all(torch.equal(before[k], after[k]) for k in before),
    }


def main(out: str) -> None:
    dist.init_process_group("gloo")
    root = f"{out}/root"
    engine = build(seed=0)
    ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    savepoint.CheckpointManager(root, dist_timeout=60).save(1, model=engine)
    ckpt = f"{root}/step-00000001"
    names = sorted(os.listdir(f"{ckpt}/{TAG_DIR}"))
    routes = {
        # the engine's checkpoint engine: model states (module weights, scheduler, client state)
        "model_states": next(n for n in names if n.endswith("model_states.pt")),
        # the ZeRO optimizer partition (fp32 master weights, moments)
        "optim_states": next(n for n in names if n.endswith("optim_states.pt")),
    }
    results: dict[str, object] = {}
    for name, victim in routes.items():
        planted = f"{out}/{name}"
        shutil.copytree(root, planted)
        torch.save({"module": Bomb(f"{out}/{name}.pwned")}, f"{planted}/step-00000001/{TAG_DIR}/{victim}")
        relist(f"{planted}/step-00000001")
        results[name] = attempt(planted, out, name)
    # DeepSpeed reads universal checkpoints with plain torch.load: refused, naming the option.
    results["load_universal"] = attempt(root, out, "load_universal", checkpoint={"load_universal": True})
    write_json(f"{out}/result.json", results)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # see worker_deepspeed.py: DeepSpeed's CPU threads can abort interpreter shutdown


if __name__ == "__main__":
    main(sys.argv[1])
