"""Save at 4 ranks, restore at 3, 2 or 1, exactly, with either `sharded_model` setting (argv: MODE OUT).

save     (torchrun, 4 ranks) FSDP2 tiny Llama + AdamW + LambdaLR, 2 training steps, then step 2 saved
         twice: OUT/gathered (sharded_model=False: full weights gathered to rank 0) and OUT/sharded
         (sharded_model=True: weights as each rank's DCP shards). The oracle is torch's own full
         state, gathered with DCP's get_model_state_dict / get_optimizer_state_dict
         (full_state_dict=True): OUT/oracle.safetensors (weights and moments) and OUT/oracle.json
         (param groups and scheduler).
restore  (torchrun at W ranks, or a plain process for W = 1, the model then unsharded) restores each
         checkpoint into a model built from other weights and compares the gathered full state and
         the scheduler with the oracle, bit for bit. Then trains 2 more steps from it and from the
         oracle loaded through DCP's set_*_state_dict, and compares both continuations, bit for bit.
         Rank 0 writes OUT/result-<W>.json: {"<checkpoint>": {"restored": ..., "continued": ...}}.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tests.distributed.common import flat_reference, write_json
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

import savepoint
from savepoint.demo import tiny

MODES = {"gathered": False, "sharded": True}
FULL = StateDictOptions(full_state_dict=True)  # every rank gets the full tensors (CPU anyway)


def distributed() -> bool:
    return dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if distributed() else 0


def build(seed: int):
    model = tiny.tiny_llama(seed=seed).train()
    if distributed():
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def train(model, opt, sched, steps: range) -> None:
    for step in steps:  # the data depends on the step and the rank only
        g = torch.Generator().manual_seed(1000 * step + rank())
        ids = torch.randint(3, 512, (2, 12), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def full_state(model, opt) -> tuple[dict[str, torch.Tensor], list]:
    """The full weights and moments, flat, and the param groups (collective: every rank calls it)."""
    if not distributed():
        names = {id(p): n for n, p in model.named_parameters()}
        state = {names[id(p)]: s for p, s in opt.state.items()}
        groups = [{**g, "params": [names[id(p)] for p in g["params"]]} for g in opt.param_groups]
        return flat_reference(model.state_dict(), {"state": state}), groups
    weights = get_model_state_dict(model, options=FULL)
    optim = get_optimizer_state_dict(model, opt, options=FULL)
    return flat_reference(weights, optim), optim["param_groups"]


def scheduler_state(sched) -> dict:
    return {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"}


def load_oracle(out: str):
    """A model, optimizer and scheduler at step 2 built from the oracle through torch's own loaders."""
    flat = load_file(f"{out}/oracle.safetensors")
    doc = json.loads(Path(out, "oracle.json").read_text())
    model, opt, sched = build(seed=3)
    weights = {k.removeprefix("model/"): v for k, v in flat.items() if k.startswith("model/")}
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        if key.startswith("optim/"):
            fqn, _, name = key.removeprefix("optim/").rpartition("/")
            state.setdefault(fqn, {})[name] = value
    optim = {"state": state, "param_groups": doc["param_groups"]}
    if distributed():
        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
        set_optimizer_state_dict(model, opt, optim, options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(weights)
        by_name = dict(model.named_parameters())
        ids = {n: i for i, n in enumerate(by_name)}
        opt.load_state_dict(
            {
                "state": {ids[n]: s for n, s in state.items()},
                "param_groups": [{**g, "params": [ids[n] for n in g["params"]]} for g in doc["param_groups"]],
            }
        )
    sched.load_state_dict({**sched.state_dict(), **doc["scheduler"]})
    return model, opt, sched


def differences(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> list[str]:
    out = sorted(expected.keys() ^ actual.keys())
    out += [k for k in sorted(expected.keys() & actual.keys()) if not torch.equal(expected[k], actual[k])]
    return out


def save(out: str) -> None:
    model, opt, sched = build(seed=0)
    train(model, opt, sched, range(1, 3))
    for name, sharded_model in MODES.items():
        mgr = savepoint.CheckpointManager(f"{out}/{name}", sharded_model=sharded_model, dist_timeout=120)
        mgr.save(2, model=model, optimizer=opt, scheduler=sched)
    flat, groups = full_state(model, opt)
    if rank() == 0:
        save_file(flat, f"{out}/oracle.safetensors")
        write_json(f"{out}/oracle.json", {"param_groups": groups, "scheduler": scheduler_state(sched)})


def restore(out: str) -> None:
    oracle = load_file(f"{out}/oracle.safetensors")
    oracle_sched = json.loads(Path(out, "oracle.json").read_text())["scheduler"]
    model, opt, sched = load_oracle(out)
    train(model, opt, sched, range(3, 5))
    continued, _ = full_state(model, opt)
    result = {}
    for name in MODES:
        model, opt, sched = build(seed=5)  # other weights: the restore must replace them all
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "saved by 4 ranks, restored at W": expected here
            step = (
                savepoint.CheckpointManager(f"{out}/{name}")
                .restore(model=model, optimizer=opt, scheduler=sched)
                .step
            )
        restored, _ = full_state(model, opt)
        sched_differs = scheduler_state(sched) != oracle_sched
        train(model, opt, sched, range(3, 5))
        again, _ = full_state(model, opt)
        if rank() == 0:
            result[name] = {
                "step": step,
                "restored": differences(oracle, restored) + (["scheduler"] if sched_differs else []),
                "continued": differences(continued, again),
                "tensors": len(restored),
            }
    if rank() == 0:
        world = dist.get_world_size() if distributed() else 1
        write_json(f"{out}/result-{world}.json", result)


def main(mode: str, out: str) -> None:
    torch.manual_seed(0)
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    (save if mode == "save" else restore)(out)
    if distributed():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
