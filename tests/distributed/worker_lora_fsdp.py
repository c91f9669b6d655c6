"""Run under `torchrun --nproc_per_node=2`: a LoRA PeftModel sharded with FSDP2, and a full model under FSDP1.

LoRA (OUT/lora): trains 2 steps, saves step 2 (adapter + AdamW + scheduler), trains to step 4; then
restores step 2 into a fresh sharded PeftModel (other adapter weights), checks the adapter and the AdamW
moments against torch's own gather, and trains to step 4 again. FSDP1 (OUT/fsdp1): the same round trip
for a `FullyShardedDataParallel` model, plus `save_pretrained`. Rank 0 writes `ref-*.safetensors`
(the gathered state at step 2) and `result.json` (losses of both runs, per rank).
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from tests.distributed.common import assert_same, flat_reference, token_data, write_json
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)

import savepoint
from savepoint.demo import tiny


def build_lora(seed: int):
    from peft import LoraConfig, get_peft_model
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)  # the adapter's initial weights differ per seed; the base is always seed 0
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(tiny.tiny_llama(seed=0), config).train()
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    return model, opt


def build_fsdp1(seed: int):
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = FullyShardedDataParallel(
        tiny.tiny_llama(seed=seed).train(), use_orig_params=True, device_id=torch.device("cpu")
    )
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def train(model, opt, sched, batches, n: int) -> list[float]:
    losses = []
    for _ in range(n):
        (ids,) = next(batches)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def gathered(model, opt, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    # No cpu_offload: the model is on the CPU already (and FSDP1's offload of CPU tensors crashes in torch 2.13).
    options = StateDictOptions(full_state_dict=True, ignore_frozen_params=trainable_only)
    weights = get_model_state_dict(model, options=options)
    moments = get_optimizer_state_dict(model, opt, options=options)  # both collective; rank 0 gets them
    return flat_reference(weights, moments) if dist.get_rank() == 0 else {}


def round_trip(name: str, out: str, build, *, trainable_only: bool = False) -> dict[str, list[float]]:
    rank = dist.get_rank()
    mgr = savepoint.CheckpointManager(f"{out}/{name}", dist_timeout=120)
    loader = torch.utils.data.DataLoader(
        token_data(n=16),
        batch_size=2,
        sampler=torch.utils.data.DistributedSampler(token_data(n=16), shuffle=False),
    )
    model, opt = build(1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    batches = iter(loader)
    train(model, opt, sched, batches, 2)
    mgr.save(2, model=model, optimizer=opt, scheduler=sched)
    ref = gathered(model, opt, trainable_only=trainable_only)
    if rank == 0:
        save_file(ref, f"{out}/ref-{name}.safetensors")
    if name == "fsdp1":
        savepoint.save_pretrained(model, f"{out}/fsdp1-export")
    rest = list(batches)
    first = train(model, opt, sched, iter(rest), 2)

    model, opt = build(2)  # other trainable weights: the restore must replace them all
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    assert mgr.restore(model=model, optimizer=opt, scheduler=sched).step == 2
    restored = gathered(model, opt, trainable_only=trainable_only)
    if rank == 0:
        assert_same(ref, restored, where=f"{name} restored at 2 ranks")
    again = train(model, opt, sched, iter(rest), 2)
    return {"first": first, "again": again}


def main(out: str) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(100 + dist.get_rank())
    mine = {
        "lora": round_trip("lora", out, build_lora, trainable_only=True),
        "fsdp1": round_trip("fsdp1", out, build_fsdp1),
    }
    losses: list = [None, None]
    dist.all_gather_object(losses, mine)
    if dist.get_rank() == 0:
        write_json(f"{out}/result.json", losses)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
