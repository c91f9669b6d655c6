"""Run under `torchrun --nproc_per_node=2` (gloo, CPU): hostile sharded checkpoints restored by every rank.

Saves step 1 of an FSDP2 model with `sharded_model=True` (weights and AdamW moments in DCP), then for
each case copies it, damages it as an attacker would (manifest rewritten to match) and restores it
into a fresh sharded model on both ranks. Writes OUT/result-<rank>.json: per case, the error raised on
this rank, the seconds it took, whether the sentinel file exists and whether this rank's shards of
the model or its optimizer changed.

    bomb       a pickle in train_state/dcp/.metadata whose unpickling creates the sentinel: every
               rank refuses it through the allow-list
    rank1-rng  rank 1's RNG blob does not decode: rank 1 refuses it, rank 0 learns it from the vote,
               and neither rank enters a collective read or changes anything
    rank1-record  rank 1's record of item checksums forged (two items' checksums swapped): the rank
               reading those items refuses them inside the collective read, every rank learns it,
               and no live shard changes
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tests.distributed.common import write_json
from tests.reliability.test_hostile_inputs import Bomb, relist
from torch.distributed.fsdp import fully_shard

import savepoint
from savepoint.demo import tiny
from savepoint.errors import SavepointError

CKPT = "step-00000001"


def build(seed: int):
    model = tiny.tiny_llama(seed=seed).train()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def local_state(model, opt) -> dict[str, torch.Tensor]:
    out = {f"model/{k}": v.to_local().clone() for k, v in model.state_dict().items()}
    for i, state in enumerate(opt.state.values()):
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out[f"optim/{i}/{key}"] = (value.to_local() if hasattr(value, "to_local") else value).clone()
    return out


def damage_rng(ckpt: str) -> None:
    relbase = f"{ckpt}/train_state/rng/rank-00001"
    doc = json.loads(Path(f"{relbase}.json").read_bytes())
    tensors = load_file(f"{relbase}.safetensors")
    key = doc["state"]["torch"]["__tensor__"]
    tensors[key] = tensors[key][:64].clone()
    save_file(tensors, f"{relbase}.safetensors")


def forge_record(ckpt: str) -> None:
    path = Path(ckpt, "train_state/dcp_ranges/rank-00001.json")
    doc = json.loads(path.read_bytes())
    spans = doc["files"][sorted(doc["files"])[0]]
    spans[0][2], spans[1][2] = spans[1][2], spans[0][2]
    path.write_text(json.dumps(doc))


def plant_bomb(ckpt: str, sentinel: str) -> None:
    Path(ckpt, "train_state/dcp/.metadata").write_bytes(pickle.dumps(Bomb(sentinel)))


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, opt = build(seed=0)
    ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(rank))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    savepoint.CheckpointManager(f"{out}/root", sharded_model=True, dist_timeout=60).save(
        1, model=model, optimizer=opt
    )
    cases = {
        "bomb": plant_bomb,
        "rank1-rng": lambda ckpt, _: damage_rng(ckpt),
        "rank1-record": lambda ckpt, _: forge_record(ckpt),
    }
    results = {}
    for name, damage in cases.items():
        root = f"{out}/{name}"
        if rank == 0:
            shutil.copytree(f"{out}/root", root)
            damage(f"{root}/{CKPT}", f"{out}/{name}.pwned")
            relist(f"{root}/{CKPT}")
        dist.barrier()
        fresh, fresh_opt = build(seed=1)
        before = local_state(fresh, fresh_opt)
        start, error = time.monotonic(), None
        try:
            savepoint.CheckpointManager(root, dist_timeout=60).restore(
                model=fresh, optimizer=fresh_opt, step=1
            )
        except SavepointError as exc:
            error = f"{type(exc).__name__}: {exc}"
        after = local_state(fresh, fresh_opt)
        results[name] = {
            "error": error,
            "seconds": time.monotonic() - start,
            "sentinel": os.path.exists(f"{out}/{name}.pwned"),
            "unchanged": before.keys() == after.keys()
            and all(torch.equal(before[k], after[k]) for k in before),
        }
        dist.barrier()
    write_json(f"{out}/result-{rank}.json", results)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
